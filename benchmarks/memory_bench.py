"""Peak memory of one SPIN iteration in each precision mode, side by side with TRL's DPOTrainer, per parameter.

    pip install -e '.[bench]'   # trl and peft, for the baseline only
    python benchmarks/memory_bench.py --out benchmarks/memory.json --markdown benchmarks/MEMORY.md   # 0.3B, ~30 min on 2 busy cores
    python benchmarks/memory_bench.py --quick                                                          # 28M, minutes

Workload (the same on every side): a random Llama-style model built here and saved once to the cache
in bf16, the dtype released checkpoints ship in (0.31B parameters: hidden 1024, 16 layers, MHA, SwiGLU 2816,
untied 49,152-token embeddings; SmolLM2's tokenizer, which `spinlm prepare-model` writes), the first 16 prompts of the bundled task; one SPIN iteration:
generation of every answer (sampling, 32 new tokens, all prompts in one batch), reference log-probs, then
one optimizer step per global batch of 8 pairs in micro batches of 4.

Figure: (peak RSS - RSS before the model loads) / parameters. Every mode runs alone in a fresh subprocess,
one after the other (never two at once: the machine is shared). Each phase's peak (load, generation, train)
comes from VmHWM, reset when the phase starts (/proc/self/clear_refs). RSS counts the pages of the weights
file a process maps, as long as they are mapped: a bf16 model read from a bf16 file can use those pages as its
weights (transformers does so: no copy), a model cast from another dtype holds its copy and, while loading, the
file's pages. For spinlm modes the run's own memory estimate (spinlm.model.memory) is recorded next to the
measurement.

Modes:
- `fp32`: trainer.precision=32 (policy, gradients and AdamW in fp32; the policy is the reference)
- `bf16`: trainer.precision=bf16 (bf16 weights and gradients; AdamW with fp32 moments and master low bits)
- `bf16_ckpt`: bf16 + model.activations_checkpoint_granularity=full
- `lora`: LoRA r=16 on a bf16 base (measured only where this spinlm has model.peft)
- `lora_ckpt`: lora + model.activations_checkpoint_granularity=full
- `trl_fp32`: HF generate + TRL DPOTrainer, policy and a separately loaded reference, fp32
- `trl_lora`: TRL DPOTrainer with peft (ref_model=None: the reference is the policy with adapters disabled),
  LoRA r=16 on a bf16 base, bf16 autocast
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from spin_bench import CACHE, _cpu_name, add_child_args, write_task  # noqa: E402

MODELS = {
    "full": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16),
    "quick": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4),
}
WORKLOAD = dict(prompts=16, new_tokens=32, global_batch=8, micro_batch=4, max_length=256, lora_rank=16, lr=5e-7,
                beta=0.1, seed=1234)
SPINLM_MODES = {
    "fp32": ["trainer.precision=32"],
    "bf16": ["trainer.precision=bf16"],
    "bf16_ckpt": ["trainer.precision=bf16", "model.activations_checkpoint_granularity=full"],
    "lora": ["trainer.precision=bf16", "model.peft.peft_scheme=lora", "model.peft.lora_tuning.adapter_dim=16",
             "model.peft.lora_tuning.alpha=16", "model.peft.lora_tuning.target_modules=[all]"],  # TRL's: all-linear
}
SPINLM_MODES["lora_ckpt"] = [*SPINLM_MODES["lora"], "model.activations_checkpoint_granularity=full"]
TRL_MODES = ("trl_fp32", "trl_lora")


# ----- memory of this process -----------------------------------------------------------------------
def _status_kb(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+)", Path("/proc/self/status").read_text(), re.M).group(1))


def rss_bytes() -> int:
    return _status_kb("VmRSS") * 1024


@contextlib.contextmanager
def phase(peaks: dict, name: str, baseline: int):
    """Record the peak RSS above `baseline` while the block runs (VmHWM reset at its start)."""
    Path("/proc/self/clear_refs").write_text("5")
    yield
    peaks[name] = _status_kb("VmHWM") * 1024 - baseline


# ----- inputs -----------------------------------------------------------------------------------------
def prepare_model(kind: str) -> Path:
    """The random model (bf16) + SmolLM2's tokenizer as a Hugging Face directory, built once."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from spinlm.model.prepare import prepare_model as prepare_smollm2

    out = CACHE / f"memory-llama-{kind}-bf16"
    if (out / "config.json").is_file():
        return out
    tokenizer = AutoTokenizer.from_pretrained(prepare_smollm2())
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **MODELS[kind])
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def parameter_count(model_dir: Path) -> int:
    from spinlm.model.loading import load_model_config
    from spinlm.model.memory import meta_model

    return sum(p.numel() for p in meta_model(load_model_config(model_dir)).parameters())


# ----- spinlm ---------------------------------------------------------------------------------------------
def spinlm_config(model_dir: Path, data: Path, run_dir: Path, w: dict, *extra: str):
    """One SPIN iteration over `data` with workload `w` (both sides' batch, lengths and seed), plus `extra`."""
    from spinlm.config import load_config

    return load_config([
        f"pretrained_checkpoint.restore_from_path={model_dir}", f"model.data.train_ds.file_path={data}",
        f"model.data.validation_ds.file_path={data}", f"exp_manager.explicit_log_dir={run_dir}",
        "trainer.spin.max_iterations=1", "trainer.spin.limit_val_batches=0",
        f"model.global_batch_size={w['global_batch']}", f"model.micro_batch_size={w['micro_batch']}",
        f"model.seed={w.get('seed', 1234)}", f"model.encoder_seq_length={w['max_length']}",
        f"model.spin.length_params.max_length={w['new_tokens']}", f"model.spin.rollout_micro_batch_size={w['prompts']}",
        f"model.spin.log_prob_forward_micro_batch_size={w['micro_batch']}", f"model.optim.lr={w.get('lr', 5e-7)}",
        f"model.spin.ref_policy_kl_penalty={w.get('beta', 0.1)}", "model.optim.sched.name=Constant",
        "model.optim.sched.warmup_steps=0", "model.data.train_ds.shuffle=false", *extra,
    ])


def run_spinlm(mode: str, model_dir: Path, data: Path) -> dict:
    from spinlm.model import memory
    from spinlm.preflight import prepare
    from spinlm.train import build_trainer

    cfg = spinlm_config(model_dir, data, Path(tempfile.mkdtemp()), WORKLOAD, "exp_manager.resume_if_exists=false",
                        *SPINLM_MODES[mode])
    prep = prepare(cfg)  # tokenizer and data once before the baseline (heap build_trainer's copies reuse)
    estimate = memory.estimate_run(cfg, prep.train.samples, "single", 1)  # the line the run prints at start
    del prep
    gc.collect()
    peaks: dict[str, int] = {}
    baseline = rss_bytes()
    with phase(peaks, "load", baseline):
        trainer = build_trainer(cfg)
    batches = trainer.augment_dataloader(0, 0)
    with phase(peaks, "generation", baseline):
        first = next(batches)
    with phase(peaks, "train", baseline):
        for batch in [first, *batches]:
            trainer.train_single_step(batch)
            trainer.step += 1
    return {"peaks": peaks, "steps": trainer.step, "estimate_peak": estimate.peak_bytes,
            "estimate_bytes_per_param": estimate.bytes_per_param, "estimate_line": estimate.line()}


# ----- TRL ------------------------------------------------------------------------------------------------
def run_trl(mode: str, model_dir: Path, data: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from spinlm.data.chat import read_chat_jsonl
    from spinlm.data.dataset import build_dataset
    from spinlm.data.render import ChatRenderer, conversation_to_messages
    from spinlm.model.generation import stop_token_ids

    w = WORKLOAD
    lora = mode == "trl_lora"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    renderer = ChatRenderer(tokenizer, None)
    ds = build_dataset(data, renderer, w["max_length"], w["max_length"] - w["new_tokens"], limit=w["prompts"])
    messages = [conversation_to_messages(c) for c in read_chat_jsonl(data)[: w["prompts"]]]
    stop_ids = stop_token_ids(tokenizer, renderer.end_strings)
    dtype = torch.bfloat16 if lora else torch.float32
    peaks: dict[str, int] = {}
    baseline = rss_bytes()
    with phase(peaks, "load", baseline):
        policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        reference = None if lora else AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    with phase(peaks, "generation", baseline):  # the reference answers (LoRA: the base model is the reference)
        torch.manual_seed(w["seed"])
        tokenizer.padding_side = "left"
        enc = tokenizer.pad({"input_ids": [ds[i]["prompt_ids"] for i in range(len(ds))]}, return_tensors="pt")
        with torch.no_grad():
            out = (reference or policy).generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                                 max_new_tokens=w["new_tokens"], eos_token_id=stop_ids,
                                                 pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    rows = [{"prompt": m[:-1], "chosen": [m[-1]], "rejected": [{"role": "assistant", "content": t}]}
            for m, t in zip(messages, texts)]
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=w["micro_batch"],
        gradient_accumulation_steps=w["global_batch"] // w["micro_batch"], max_steps=len(rows) // w["global_batch"],
        learning_rate=w["lr"], lr_scheduler_type="constant", beta=w["beta"], max_length=w["max_length"],
        bf16=lora, fp16=False, gradient_checkpointing=False, logging_steps=1, report_to="none",
        save_strategy="no", seed=w["seed"], dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
    )
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=w["lora_rank"], lora_alpha=w["lora_rank"], lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    with phase(peaks, "train", baseline):
        trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, peft_config=peft_config)
        trainer.train()
    return {"peaks": peaks, "steps": trainer.state.global_step}


# ----- on paper: 7B and 70B on 8 x 80 GB ---------------------------------------------------------------------
PAPER_MODELS = {  # Llama-2's shapes
    "7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=32000),
}
PAPER_MODES = {  # label: (trainer.precision, recomputation, LoRA rank, the benchmark's mode measuring it)
    "32": ("32", None, None, "fp32"), "bf16-mixed": ("bf16-mixed", None, None, None), "bf16": ("bf16", None, None, "bf16"),
    "bf16 + full recompute": ("bf16", "full", None, "bf16_ckpt"), "LoRA r=16, bf16 base": ("bf16", None, 16, "lora"),
    "LoRA r=16, bf16 base + full recompute": ("bf16", "full", 16, "lora_ckpt"),
}
# a SPIN run at scale: 2048-token sequences (prompt <= 1536), 512 new tokens, micro batch 1, 16 prompts per rollout batch
PAPER_WORK = dict(micro_batch_size=1, row_tokens=2048 + 512, answer_tokens=512, mean_answer_tokens=256, rollout_batch=16,
                  prompt_tokens=1536, new_tokens=512)


def decoder_linears(config) -> list[str]:
    """The linear layers of the decoder (LoRA's `all`: attention and MLP, not the LM head), on a meta model."""
    from spinlm.model.memory import meta_model

    model = meta_model(config)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]


def on_paper(gpus: int = 8, gpu_gib: float = 79.0, measured: dict | None = None) -> str:
    """Per-GPU memory of 7B and 70B runs by spinlm's estimator (model/memory.py), as a markdown table; an
    80 GB GPU leaves ~79 GiB to a process (the CUDA context takes the rest). `measured`: a --out file's
    bytes_per_param, scaled to each model (parameters x measured B/param, / GPUs under FSDP2)."""
    from transformers import LlamaConfig

    from spinlm.model import memory
    from spinlm.model.precision import precision_of

    gib = 2**30
    measured = measured or {}
    lines = ["| model | mode | strategy | B/param per GPU | weights + grads + AdamW + reference (GiB) | "
             "train step peak (GiB) | generation peak (GiB) | fits 80 GB? | at the 0.3B model's measured B/param (GiB) |",
             "|---|---|---|---:|---:|---:|---:|---|---:|"]
    for name, shape in PAPER_MODELS.items():
        config = LlamaConfig(**shape)
        for label, (precision, ckpt, rank, bench_mode) in PAPER_MODES.items():
            lora = None if rank is None else (rank, decoder_linears(config))
            for strategy, n in (("single", 1), ("ddp", gpus), ("fsdp", gpus)):
                if strategy == "single" and (lora is None or name != "7B"):
                    continue  # one GPU: LoRA on 7B only
                est = memory.estimate(config, precision_of(precision), strategy, n, memory.Workload(**PAPER_WORK),
                                      (ckpt, None, None), lora=lora)
                train = est.static_bytes + sum(est.train_extra.values())
                gen = est.static_bytes + sum(est.generation_extra.values()) - (
                    est.per_param["gradients"] * est.parameters if est.gradients_freed else 0)
                fits = "yes" if est.peak_bytes <= gpu_gib * gib else "**no**"
                value = measured.get(bench_mode) if bench_mode else None
                scaled = "-" if value is None else f"{value * est.parameters / est.ranks / gib:.0f}"
                where = {"single": "1 GPU", "ddp": f"DDP x {n}", "fsdp": f"FSDP2 x {n}"}[strategy]
                lines.append(f"| {name} | `{label}` | {where} | {est.bytes_per_param:.3g} | {est.static_bytes / gib:.0f} | "
                             f"{train / gib:.0f} | {gen / gib:.0f} | {fits} | {scaled} |")
    return "\n".join(lines)


# ----- driver ---------------------------------------------------------------------------------------------
def child(args) -> None:
    spec = json.loads(Path(args.spec).read_text())
    torch.set_num_threads(spec["threads"])
    fn = run_trl if args.child in TRL_MODES else run_spinlm
    out = fn(args.child, Path(spec["model"]), Path(spec["data"]))
    Path(args.child_out).write_text(json.dumps(out, indent=1))


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def spinlm_has_lora() -> bool:
    from spinlm.config import load_config

    return "peft" in load_config([]).model


def wait_for_memory(needed: int, poll_s: float = 30.0, give_up_s: float = 1800.0) -> None:
    """Start a mode only when the machine has room for it (others share it)."""
    waited = 0.0
    while True:
        available = int(re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) * 1024
        if available >= needed or waited >= give_up_s:
            return
        print(f"[memory_bench] waiting: {available / 2**30:.1f} GiB available, {needed / 2**30:.1f} wanted", flush=True)
        time.sleep(poll_s)
        waited += poll_s


def summarize(results: dict, params: int, meta: dict) -> dict:
    def per_param(mode):
        return max(results[mode]["peaks"].values()) / params if mode in results else None

    out = {
        "bytes_per_param": {m: per_param(m) for m in SPINLM_MODES},
        "trl_bytes_per_param": {"fp32": per_param("trl_fp32"), "lora": per_param("trl_lora")},
        "phase_peaks_bytes": {m: r["peaks"] for m, r in results.items()},
        "estimate_peak_bytes": {m: r["estimate_peak"] for m, r in results.items() if "estimate_peak" in r},
        "parameters": params, "workload": WORKLOAD, "meta": meta, "results": results,
    }
    b, t = out["bytes_per_param"], out["trl_bytes_per_param"]
    ratio = lambda x, y: None if x is None or y is None else x / y  # noqa: E731
    out["targets"] = {
        "lora_bytes_per_param": b["lora"], "lora_ckpt_bytes_per_param": b["lora_ckpt"], "bf16_ckpt_over_fp32": ratio(b["bf16_ckpt"], b["fp32"]),
        "fp32_over_trl_fp32": ratio(b["fp32"], t["fp32"]), "lora_over_trl_lora": ratio(b["lora"], t["lora"]),
    }
    out["estimate_over_measured"] = {m: e / max(results[m]["peaks"].values())
                                     for m, e in out["estimate_peak_bytes"].items()}
    return out


def markdown(r: dict) -> str:
    m, w, gib = r["meta"], r["workload"], 2**30
    fmt = lambda v, f="{:.2f}": "not measured" if v is None else f.format(v)  # noqa: E731
    lines = [
        "# Memory per parameter: spinlm's precision modes vs TRL's DPOTrainer",
        "",
        f"`python benchmarks/memory_bench.py {' '.join(m['argv'])}`, {m['date']}.",
        "",
        f"- machine: {m['cpu']}, {m['threads']} threads, {m['ram_gib']:.0f} GiB RAM (shared); python {m['python']}, "
        f"torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']}, peft {m['peft']}",
        f"- model: random Llama-style, {r['parameters'] / 1e6:.1f}M parameters ({m['model_shape']}); "
        f"{w['prompts']} prompts of the bundled task, {w['new_tokens']} new tokens, global batch {w['global_batch']}, "
        f"micro batch {w['micro_batch']}, max length {w['max_length']}",
        "- figure: (peak RSS - RSS before the model loads) / parameters; each mode alone in its own process",
        "",
        "| mode | bytes/param | peak GiB: load | generation | train | spinlm's estimate (GiB) | estimate / measured |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    names = [*SPINLM_MODES, *TRL_MODES]
    for mode in names:
        peaks = r["phase_peaks_bytes"].get(mode)
        value = r["bytes_per_param"].get(mode) if mode in SPINLM_MODES else r["trl_bytes_per_param"][mode[4:]]
        est = r["estimate_peak_bytes"].get(mode)
        cells = [fmt(peaks and peaks.get(k) / gib) for k in ("load", "generation", "train")] if peaks else ["-"] * 3
        lines.append(f"| `{mode}` | {fmt(value)} | {' | '.join(cells)} | {fmt(est and est / gib)} | "
                     f"{fmt(r['estimate_over_measured'].get(mode))} |")
    t = r["targets"]
    lines += ["", "Targets:", "", "| target | measured |", "|---|---:|",
              f"| `lora` <= 3.0 B/param | {fmt(t['lora_bytes_per_param'])} |",
              f"| `lora_ckpt` (lora + recomputation) <= 3.0 B/param | {fmt(t['lora_ckpt_bytes_per_param'])} |",
              f"| `bf16_ckpt` <= 0.5x `fp32` | {fmt(t['bf16_ckpt_over_fp32'], '{:.3f}x')} |",
              f"| spinlm `fp32` <= 0.6x TRL `fp32` | {fmt(t['fp32_over_trl_fp32'], '{:.3f}x')} |",
              f"| spinlm `lora` <= 0.8x TRL `lora` | {fmt(t['lora_over_trl_lora'], '{:.3f}x')} |", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a 28M-parameter model (minutes)")
    p.add_argument("--out", default=None, help="write the JSON result here")
    p.add_argument("--markdown", default=None, help="write the table with date, machine and versions here")
    p.add_argument("--modes", default=",".join([*SPINLM_MODES, *TRL_MODES]), help="comma-separated modes to run")
    p.add_argument("--merge", default=None,
                   help="a previous --out file: keep its modes' measurements, run only --modes (same model and workload)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--on-paper", action="store_true",
                   help="print the 7B / 70B per-GPU table (8 x 80 GB; with --out: a measured result file to scale) and exit")
    add_child_args(p, [*SPINLM_MODES, *TRL_MODES])
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    if args.on_paper:
        print(on_paper(measured=json.loads(Path(args.out).read_text())["bytes_per_param"] if args.out else None))
        return 0

    kind = "quick" if args.quick else "full"
    model = prepare_model(kind)
    params = parameter_count(model)
    work = Path(tempfile.mkdtemp(prefix="memory-bench-"))
    data = write_task(work / "task", WORKLOAD["prompts"])
    (work / "spec.json").write_text(json.dumps({"model": str(model), "data": str(data), "threads": args.threads}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    modes = [m for m in args.modes.split(",") if m]
    if not spinlm_has_lora():
        print("[memory_bench] lora: this spinlm has no model.peft keys; not measured", flush=True)
        modes = [m for m in modes if not m.startswith("lora")]
    results = json.loads(Path(args.merge).read_text())["results"] if args.merge else {}
    for mode in modes:
        wait_for_memory(int(params * 24))
        print(f"[memory_bench] {mode} ({params / 1e6:.0f}M parameters) ...", flush=True)
        out = work / f"{mode}.json"
        subprocess.run([sys.executable, __file__, "--child", mode, "--spec", str(work / "spec.json"),
                        "--child-out", str(out)], check=True, env=env)
        results[mode] = json.loads(out.read_text())
        peak = max(results[mode]["peaks"].values())
        print(f"[memory_bench] {mode}: {peak / params:.2f} B/param, phases (GiB) "
              + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in results[mode]["peaks"].items()), flush=True)
    import transformers

    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": _cpu_name(), "threads": args.threads,
            "ram_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": _version("trl"), "peft": _version("peft"), "argv": argv if argv is not None else sys.argv[1:],
            "model_shape": ", ".join(f"{k} {v}" for k, v in MODELS[kind].items())}
    summary = summarize(results, params, meta)
    summary["markdown"] = markdown(summary)
    print(summary["markdown"])
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(summary["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
