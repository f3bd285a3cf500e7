"""One SPIN iteration, side by side: spinlm vs what users build today (HF generate + TRL DPOTrainer).

    pip install -e '.[bench]'                                  # trl (pinned), for the baseline only
    python benchmarks/spin_bench.py --quick                    # tiny random model, a few minutes
    python benchmarks/spin_bench.py --out benchmarks/results.json   # SmolLM2-135M-Instruct, fp32
    python benchmarks/spin_bench.py --generation               # generation tokens/s: spinlm, hf, vllm backends

Workload (identical for both sides): the same model loaded twice (policy + reference), the same
prompts (token ids rendered by spinlm's chat renderer), the same sampling parameters (temperature
1.0, no top-k/top-p, same stop tokens, same max new tokens, same generation batch), one DPO/SPIN
step per global batch over every prompt, the same beta, lr (constant), AdamW betas/eps/weight
decay, gradient clipping and precision (fp32).

- baseline: `model.generate` (left-padded batches, default settings otherwise); the answers are
  decoded to text; TRL `DPOTrainer` with chosen = ground truth, rejected = generation, a
  separately loaded reference model, gradient checkpointing and bf16 explicitly off (TRL turns
  them on by default), one step per global batch.
- spinlm: `SPINTrainer` generation + reference log-probs + training steps of one iteration.

Each side runs in its own subprocess (peak RSS = that process's ru_maxrss), ``--repeats`` times,
alternating; each side's fastest iteration counts (a shared machine only ever slows a run down). MFU = FLOPs of one
training step (counted by torch's FlopCounterMode, everything the step executes) / median step
time / the dense fp32 matmul rate measured by a large torch.mm in the same run. Sanity: both
sides see the same first global batch (no shuffling) and report its loss and mean policy
log-prob of the ground-truth answers.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import generation_bench  # noqa: E402  (benchmarks/: on the path when this file runs as a script)

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("SPINLM_BENCH_CACHE", Path.home() / ".cache" / "spinlm-bench"))

WORKLOADS = {
    "quick": dict(prompts=16, new_tokens=16, global_batch=4, max_length=512, gen_batch=16, ref_batch=8, micro_batch=4),
    "full": dict(prompts=64, new_tokens=48, global_batch=8, max_length=256, gen_batch=64, ref_batch=16, micro_batch=8),
}
COMMON = dict(beta=0.1, lr=5e-7, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1, clip=1.0, seed=1234,
              temperature=1.0)


# ----- inputs: model and data -------------------------------------------------------------------------
def prepare_model(quick: bool) -> Path:
    """A Hugging Face model directory: a tiny random model (quick) or SmolLM2-135M-Instruct (from GGUF)."""
    if quick:
        from spinlm.model.tiny import save_tiny_model

        out = CACHE / "tiny"
        if not (out / "config.json").is_file():
            save_tiny_model(out, seed=0, max_position_embeddings=512)
        return out
    from spinlm.model.prepare import prepare_model as prepare_smollm2

    return prepare_smollm2()


def write_task(path: Path, n: int, seed: int = 0) -> Path:
    """The first n training conversations of spinlm's bundled verifiable task (`spinlm make-task`)."""
    from spinlm.data.tasks import write_task as write_bundled_task

    return write_bundled_task(path, {"train": n}, seed=seed)["train"]


def load_samples(model_dir: Path, data: Path, w: dict):
    """spinlm's rendering of the data: the prompt/answer ids both sides use, and the raw conversations."""
    from spinlm.data.chat import read_chat_jsonl
    from spinlm.data.dataset import build_dataset
    from spinlm.data.render import ChatRenderer, conversation_to_messages
    from spinlm.model.loading import load_pretrained

    model, tokenizer = load_pretrained(model_dir)
    renderer = ChatRenderer(tokenizer, None)
    ds = build_dataset(data, renderer, w["max_length"], w["max_length"] - w["new_tokens"], limit=w["prompts"])
    convs = read_chat_jsonl(data)[: w["prompts"]]
    return model, tokenizer, renderer, ds, [conversation_to_messages(c) for c in convs]


def add_child_args(p, modes: list[str]) -> None:
    """The hidden options of a benchmark's child process: which mode it runs, its spec and result files."""
    p.add_argument("--child", choices=modes, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)


# ----- measurements shared by both sides --------------------------------------------------------------
def matmul_rates(n: int = 2048, repeats: int = 8, bf16: bool = False) -> dict[str, float]:
    """Best-of fp32 dense matmul FLOP/s of this process, by ``torch.mm`` (PyTorch's BLAS) and by oneDNN.

    The faster of the two is the machine's dense rate, the MFU denominator: on AMD CPUs MKL
    (behind ``torch.mm``) runs AVX2 code and reaches about half of what oneDNN does. `bf16` adds a
    bf16 ``torch.mm`` (PyTorch sends bf16 CPU products to oneDNN).
    """
    from spinlm.model.kernels import onednn_mm, onednn_available

    a, b = torch.randn(n, n), torch.randn(n, n)
    kernels = {"torch.mm": lambda: torch.mm(a, b)}
    if onednn_available():
        kernels["onednn"] = lambda: onednn_mm(a, b)
    if bf16:
        a16, b16 = a.bfloat16(), b.bfloat16()
        kernels["bf16 torch.mm"] = lambda: torch.mm(a16, b16)
    rates = {}
    for name, fn in kernels.items():
        fn()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        rates[name] = 2 * n**3 / best
    return rates


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def step_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    _count_onednn_linears()
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


@functools.cache
def _count_onednn_linears() -> None:
    """Teach FlopCounterMode spinlm's oneDNN linear layers (it counts aten ops only)."""
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.mkldnn._linear_pointwise)
    def _linear_flops(x_shape, w_shape, *args, **kwargs) -> int:
        rows = 1
        for d in x_shape[:-1]:
            rows *= d
        return 2 * rows * x_shape[-1] * w_shape[0]


# ----- baseline: HF generate + TRL DPOTrainer -----------------------------------------------------------
def run_baseline(model_dir: Path, data: Path, w: dict) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from spinlm.model.generation import stop_token_ids

    policy, tokenizer, renderer, ds, messages = load_samples(model_dir, data, w)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=False)
    stop_ids = stop_token_ids(tokenizer, renderer.end_strings)
    torch.manual_seed(COMMON["seed"])

    # generation: what a user writes
    t0, c0 = time.perf_counter(), time.process_time()
    prompts = [ds[i]["prompt_ids"] for i in range(len(ds))]
    texts, n_tokens = [], 0
    tokenizer.padding_side = "left"
    reference.eval()
    for s in range(0, len(prompts), w["gen_batch"]):
        chunk = prompts[s:s + w["gen_batch"]]
        enc = tokenizer.pad({"input_ids": chunk}, return_tensors="pt")
        with torch.no_grad():
            out = reference.generate(**enc, do_sample=True, temperature=COMMON["temperature"], top_k=0, top_p=1.0,
                                     max_new_tokens=w["new_tokens"], eos_token_id=stop_ids,
                                     pad_token_id=tokenizer.pad_token_id)
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            cut = next((k + 1 for k, t in enumerate(row) if t in stop_ids), len(row))
            n_tokens += cut
            texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    t_gen, c_gen = time.perf_counter() - t0, time.process_time() - c0

    rows = [{"prompt": m[:-1], "chosen": [m[-1]], "rejected": [{"role": "assistant", "content": t}]}
            for m, t in zip(messages, texts)]
    steps = len(rows) // w["global_batch"]
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"), per_device_train_batch_size=w["global_batch"],
        gradient_accumulation_steps=1, max_steps=steps, learning_rate=COMMON["lr"], lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=COMMON["weight_decay"], adam_beta1=COMMON["betas"][0],
        adam_beta2=COMMON["betas"][1], adam_epsilon=COMMON["eps"], max_grad_norm=COMMON["clip"],
        beta=COMMON["beta"], max_length=w["max_length"], bf16=False, fp16=False, gradient_checkpointing=False,
        logging_steps=1, report_to="none", save_strategy="no", seed=COMMON["seed"], dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        train_sampling_strategy="sequential",  # the same first batch as spinlm (data.shuffle=false)
    )
    step_times, step_logs = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_times.append(time.perf_counter() - self.t)

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                step_logs.append(dict(logs))

    t1 = time.perf_counter()
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=tokenizer, callbacks=[Timer()])
    trainer.train()
    t_train, c_iter = time.perf_counter() - t1, time.process_time() - c0
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    flops = step_flops(lambda: trainer.training_step(trainer.model, batch))
    return {
        "generation_s": t_gen, "generated_tokens": n_tokens, "generation_tokens_per_s": n_tokens / t_gen,
        "ref_logprobs_s": None,  # inside each training step (TRL scores the reference per step)
        "train_s": t_train, "train_steps": steps, "train_step_s": statistics.median(step_times),
        "train_step_flops": flops, "iteration_s": t_gen + t_train, "samples": len(rows),
        "generation_cpu_s": c_gen, "iteration_cpu_s": c_iter,
        "train_tokens_per_s": float(step_logs[-1].get("num_tokens", 0)) / sum(step_times),
        "first_step_loss": step_logs[0]["loss"], "first_step_logps_actual": step_logs[0].get("logps/chosen"),
        "peak_rss_gb": peak_rss_gb(),
    }


# ----- spinlm -------------------------------------------------------------------------------------------
def run_spinlm(model_dir: Path, data: Path, w: dict) -> dict:
    from spinlm.config import load_config
    from spinlm.train import build_trainer

    run_dir = Path(tempfile.mkdtemp(prefix="bench-spinlm-"))
    cfg = load_config([
        f"pretrained_checkpoint.restore_from_path={model_dir}",
        f"model.data.train_ds.file_path={data}", f"model.data.validation_ds.file_path={data}",
        f"exp_manager.explicit_log_dir={run_dir}", "exp_manager.resume_if_exists=false",
        "trainer.precision=32", "trainer.spin.max_iterations=1", "trainer.spin.max_epochs=1",
        "trainer.spin.limit_val_batches=0", f"trainer.spin.gradient_clip_val={COMMON['clip']}",
        f"model.global_batch_size={w['global_batch']}", f"model.micro_batch_size={w['micro_batch']}",
        f"model.seed={COMMON['seed']}", f"model.encoder_seq_length={w['max_length']}",
        f"model.spin.length_params.max_length={w['new_tokens']}",
        f"model.spin.rollout_micro_batch_size={w['gen_batch']}",
        f"model.spin.log_prob_forward_micro_batch_size={w['ref_batch']}",
        f"model.spin.ref_policy_kl_penalty={COMMON['beta']}",
        f"model.spin.sampling_params.temperature={COMMON['temperature']}",
        f"model.optim.lr={COMMON['lr']}", f"model.optim.betas=[{COMMON['betas'][0]},{COMMON['betas'][1]}]",
        f"model.optim.eps={COMMON['eps']}", f"model.optim.weight_decay={COMMON['weight_decay']}",
        "model.optim.sched.name=Constant", "model.data.train_ds.shuffle=false",
    ])
    trainer = build_trainer(cfg)

    t0, c0 = time.perf_counter(), time.process_time()
    steps, first, batches = [], None, []
    for batch in trainer.augment_dataloader(0, 0):
        if not batches:
            timings = dict(trainer._pending_timings)
            c_gen = time.process_time() - c0
        metrics = trainer.train_single_step(batch)
        trainer.step += 1
        steps.append(metrics["step_time"])
        first = first or metrics
        batches.append(batch)
    t_iter, c_iter = time.perf_counter() - t0, time.process_time() - c0
    flops = step_flops(lambda: trainer.train_single_step(batches[0]))
    n_tokens = timings["timing/generation_tokens_per_s"] * timings["timing/generation_s"]
    return {
        "generation_s": timings["timing/generation_s"], "generated_tokens": round(n_tokens),
        "generation_tokens_per_s": timings["timing/generation_tokens_per_s"],
        "ref_logprobs_s": timings["timing/ref_logprobs_s"], "train_s": sum(steps), "train_steps": len(steps),
        "train_step_s": statistics.median(steps), "train_step_flops": flops, "iteration_s": t_iter,
        "generation_cpu_s": c_gen, "iteration_cpu_s": c_iter,  # generation_cpu_s includes reference scoring
        "samples": len(trainer.train_dataset), "first_step_loss": first["loss"],
        # prompt + answer tokens of both sequences of every pair (TRL's num_tokens counts the same)
        "train_tokens_per_s": sum(int(b["actual_mask"].sum()) + int(b["generated_lengths"].sum())
                                  + 2 * int(b["prompt_lengths"].sum()) for b in batches) / sum(steps),
        "first_step_logps_actual": first["logps_actual_mean"], "peak_rss_gb": peak_rss_gb(),
    }


# ----- driver -------------------------------------------------------------------------------------------
def summarize(base: dict, ours: dict, rates: dict[str, float], w: dict, meta: dict) -> dict:
    rate = max(rates.values())

    def mfu(side):
        return side["train_step_flops"] / side["train_step_s"] / rate

    result = {
        "iteration_time_ratio": ours["iteration_s"] / base["iteration_s"],
        "generation_speedup": ours["generation_tokens_per_s"] / base["generation_tokens_per_s"],
        "train_mfu": mfu(ours),
        "peak_memory_ratio": ours["peak_rss_gb"] / base["peak_rss_gb"],
        "baseline_train_mfu": mfu(base),
        "train_step_time_ratio": ours["train_step_s"] / base["train_step_s"],
        # CPU seconds (all threads) of the iteration: a second view that other load on the machine distorts less
        "iteration_cpu_time_ratio": ours["iteration_cpu_s"] / base["iteration_cpu_s"],
        "matmul_flops_per_s": rate, "matmul_rates": rates,
        "workload": w, "common": COMMON, "meta": meta,
        "baseline": base, "spinlm": ours,
    }
    for side in (base, ours):
        side["train_samples_per_s"] = w["global_batch"] / side["train_step_s"]
    return result


ROWS = [
    ("iteration wall time (s)", "iteration_s", "{:.1f}"),
    ("iteration CPU time, all threads (s)", "iteration_cpu_s", "{:.1f}"),
    ("generation (s)", "generation_s", "{:.1f}"),
    ("generation tokens/s", "generation_tokens_per_s", "{:.1f}"),
    ("generated tokens", "generated_tokens", "{:d}"),
    ("reference log-probs (s)", "ref_logprobs_s", "{:.1f}"),
    ("training (s)", "train_s", "{:.1f}"),
    ("train step, median (s)", "train_step_s", "{:.2f}"),
    ("train samples/s", "train_samples_per_s", "{:.2f}"),
    ("train tokens/s (prompt + answer, both sequences)", "train_tokens_per_s", "{:.0f}"),
    ("train step GFLOP (counted)", "train_step_flops", "{:.2f}"),
    ("peak RSS (GB)", "peak_rss_gb", "{:.2f}"),
    ("first-step loss", "first_step_loss", "{:.4f}"),
    ("first batch: mean policy log p(ground truth)", "first_step_logps_actual", "{:.2f}"),
]


def markdown(r: dict) -> str:
    b, s = r["baseline"], r["spinlm"]
    lines = ["| phase | HF generate + TRL DPOTrainer | spinlm | spinlm / baseline |", "|---|---:|---:|---:|"]
    for label, key, fmt in ROWS:
        bv, sv = b.get(key), s.get(key)
        if key == "train_step_flops":
            bv, sv = bv / 1e9, sv / 1e9
        ratio = f"{sv / bv:.3f}" if isinstance(bv, (int, float)) and bv and key not in ("first_step_loss",) else ""
        fmt_b = ("in each step" if key == "ref_logprobs_s" else "-") if bv is None else fmt.format(bv)
        fmt_s = "-" if sv is None else fmt.format(sv)
        lines.append(f"| {label} | {fmt_b} | {fmt_s} | {ratio} |")
    lines += [
        "",
        f"- iteration_time_ratio **{r['iteration_time_ratio']:.3f}** (target <= 0.4)",
        *([f"- iteration CPU-time ratio {r['iteration_cpu_time_ratio']:.3f} (less sensitive to other load on the machine)"]
          if "iteration_cpu_time_ratio" in r else []),
        f"- generation_speedup **{r['generation_speedup']:.2f}x** (target >= 2)",
        f"- train_mfu **{r['train_mfu']:.3f}** (target >= 0.5; baseline {r['baseline_train_mfu']:.3f}); "
        f"machine's fp32 dense matmul rate {r['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s (best of "
        + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in r.get("matmul_rates", {}).items()) + ")",
        f"- peak_memory_ratio **{r['peak_memory_ratio']:.3f}** (target <= 0.7)",
    ]
    if len(r.get("rounds", [])) > 1:
        lines += [
            "",
            f"Each side ran {len(r['rounds'])} times, alternating; the table holds each side's fastest iteration. "
            "Round by round (spinlm / baseline of the same round):",
            "",
            "| round | baseline iteration (s) | spinlm iteration (s) | iteration ratio | generation speedup |",
            "|---|---:|---:|---:|---:|",
            *(f"| {k + 1} | {x['baseline_iteration_s']:.1f} | {x['spinlm_iteration_s']:.1f} | "
              f"{x['iteration_time_ratio']:.3f} | {x['generation_speedup']:.2f}x |" for k, x in enumerate(r["rounds"])),
        ]
    return "\n".join(lines)


def results_page(r: dict, argv: list[str]) -> str:
    m, w = r["meta"], r["workload"]
    return "\n".join([
        "# SPIN iteration benchmark: spinlm vs HF generate + TRL DPOTrainer",
        "",
        f"`python benchmarks/spin_bench.py {' '.join(argv)}` ({m['mode']} workload), {m['date']}.",
        "",
        f"- machine: {m['cpu']}, {m['threads']} threads; python {m['python']}, torch {m['torch']}, "
        f"transformers {m['transformers']}, trl {m['trl']}",
        f"- model: `{Path(m['model']).name}`, fp32; data: {w['prompts']} prompts of the bundled task "
        f"(`spinlm make-task`); {w['new_tokens']} new tokens max, temperature {r['common']['temperature']}, "
        f"generation batch {w['gen_batch']}; global batch {w['global_batch']} "
        f"({w['prompts'] // w['global_batch']} steps), beta {r['common']['beta']}, lr {r['common']['lr']} constant, "
        f"max length {w['max_length']}; spinlm micro batch {w['micro_batch']} pairs",
        "",
        markdown(r),
        "",
    ])


def child(args) -> None:
    spec = json.loads(Path(args.spec).read_text())
    if args.child.startswith("gen-"):
        out = generation_bench.run_child(args.child[4:], spec)
        Path(args.child_out).write_text(json.dumps(out, indent=1))
        return
    fn = run_baseline if args.child == "baseline" else run_spinlm
    torch.set_num_threads(spec["threads"])
    out = fn(Path(spec["model"]), Path(spec["data"]), spec["workload"])
    Path(args.child_out).write_text(json.dumps(out, indent=1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random model, small workload (< 5 min)")
    p.add_argument("--out", default=None, help="write the JSON result here (default: print only)")
    p.add_argument("--markdown", default=None, help="also write the table with date, machine and versions (RESULTS.md)")
    p.add_argument("--model", default=None, help="a Hugging Face model directory instead of the default")
    p.add_argument("--data", default=None, help="chat JSONL instead of the bundled task")
    p.add_argument("--prompts", type=int, default=None, help="number of prompts (default: per workload)")
    p.add_argument("--repeats", type=int, default=None,
                   help="rounds of both sides, alternating; each side's fastest iteration counts (default: 1 quick, 2 full)")
    p.add_argument("--sides", default="baseline,spinlm", help="which sides to run (debugging)")
    p.add_argument("--reuse-baseline", default=None, help="take the baseline from an earlier --out FILE (development)")
    p.add_argument("--generation", action="store_true", help="generation tokens/s of the spinlm, hf and vllm backends")
    p.add_argument("--vllm-python", default=sys.executable, help="python of an environment with vLLM (--generation)")
    add_child_args(p, ["baseline", "spinlm", *(f"gen-{b}" for b in generation_bench.BACKENDS)])
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0

    w = dict(WORKLOADS["quick" if args.quick else "full"])
    if args.prompts:
        w["prompts"] = args.prompts
    work = Path(tempfile.mkdtemp(prefix="spin-bench-"))
    if args.model or not (args.quick and args.generation):
        model = Path(args.model) if args.model else prepare_model(args.quick)
    else:
        model = generation_bench.quick_model(CACHE)
    if args.data:  # the first N conversations, so both sides see exactly the same ones
        lines = Path(args.data).read_text(encoding="utf-8").splitlines(keepends=True)[: w["prompts"]]
        data = work / "task.jsonl"
        data.write_text("".join(lines), encoding="utf-8")
    else:
        data = write_task(work / "task", w["prompts"])
    threads = torch.get_num_threads()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    if args.generation:
        return generation_main(args, w, model, data, work, threads, env, argv)
    rates = matmul_rates()
    spec = {"model": str(model), "data": str(data), "workload": w, "threads": threads}
    (work / "spec.json").write_text(json.dumps(spec))
    runs: dict[str, list[dict]] = {}
    if args.reuse_baseline:
        runs["baseline"] = [json.loads(Path(args.reuse_baseline).read_text())["baseline"]]
    repeats = args.repeats or (1 if args.quick else 2)
    for round_ in range(repeats):  # alternating, so a slow spell of the machine hits both sides
        for side in args.sides.split(","):
            if args.reuse_baseline and side == "baseline":
                continue
            out = work / f"{side}-{round_}.json"
            print(f"[spin_bench] round {round_ + 1}/{repeats}: running {side} ...", flush=True)
            subprocess.run([sys.executable, __file__, "--child", side, "--spec", str(work / "spec.json"),
                            "--child-out", str(out)], check=True, env=env)
            runs.setdefault(side, []).append(json.loads(out.read_text()))
            print(json.dumps(runs[side][-1], indent=1), flush=True)
    if len(runs) < 2:
        return 0
    sides = {side: min(rs, key=lambda r: r["iteration_s"]) for side, rs in runs.items()}
    import transformers
    import trl

    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or platform.machine(),
        "cpu": _cpu_name(), "threads": threads, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "trl": trl.__version__, "model": str(model), "data": str(data),
        "mode": "quick" if args.quick else "full",
    }
    result = summarize(sides["baseline"], sides["spinlm"], rates, w, meta)
    result["rounds"] = [
        {"iteration_time_ratio": o["iteration_s"] / b["iteration_s"],
         "generation_speedup": o["generation_tokens_per_s"] / b["generation_tokens_per_s"],
         "baseline_iteration_s": b["iteration_s"], "spinlm_iteration_s": o["iteration_s"]}
        for b, o in zip(runs["baseline"] * (len(runs["spinlm"]) if args.reuse_baseline else 1), runs["spinlm"])
    ]
    result["markdown"] = markdown(result)
    print(result["markdown"])
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"[spin_bench] wrote {args.out}")
    if args.markdown:
        Path(args.markdown).write_text(results_page(result, argv if argv is not None else sys.argv[1:]))
        print(f"[spin_bench] wrote {args.markdown}")
    return 0


def generation_main(args, w: dict, model: Path, data: Path, work: Path, threads: int, env: dict, argv) -> int:
    """--generation: the backends side by side on the same workload; vllm from --vllm-python when it has vLLM."""
    spec = {"model": str(model), "data": str(data), "workload": w, "threads": threads, "seed": COMMON["seed"],
            "temperature": COMMON["temperature"]}
    (work / "spec.json").write_text(json.dumps(spec))
    pythons = {"spinlm": sys.executable, "hf": sys.executable, "vllm": args.vllm_python}
    if not generation_bench.vllm_importable(args.vllm_python):
        print(f"[spin_bench] no vLLM in {args.vllm_python}: vllm side skipped (see --vllm-python)", flush=True)
        del pythons["vllm"]
    result = generation_bench.compare(work / "spec.json", work, __file__, env, args.repeats or 1, pythons)
    result.update(workload=w, meta={"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": _cpu_name(),
                                    "threads": threads, "model": str(model), "argv": argv or sys.argv[1:]})
    result["markdown"] = generation_bench.markdown(result)
    print(result["markdown"])
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
