"""The SPIN train step in bf16 against fp32 on this CPU, side by side in one run.

    python benchmarks/precision_bench.py                      # SmolLM2-135M-Instruct, ~15 min on 2 busy cores
    python benchmarks/precision_bench.py --model DIR --rounds 3 --out benchmarks/precision.json

Every mode trains the same batch (one global batch of the bundled task, its answers generated once by the
fp32 reference) with `SPINTrainer.train_single_step`; modes alternate round by round (a slow spell of a
shared machine hits all of them) and each mode's fastest step counts. Also reports the dense matmul rate of
the kernels behind each mode (a 2048^3 product): fp32 through PyTorch's BLAS (MKL), fp32 through oneDNN,
bf16 through PyTorch (which sends bf16 CPU matmuls to oneDNN's AVX512-BF16 kernels).

Also times the reference's decoding under bf16-mixed: stored in the compute dtype (spinlm) against an
fp32 copy under the same autocast, which casts every weight at every step.

Modes: `32` (fp32, oneDNN linear layers where faster: spinlm's default kernel), `32-mkl`
(model.cpu_linear_kernel=default), `bf16-mixed` (fp32 weights, bf16 autocast), `bf16`, `bf16-ckpt` (bf16 +
full activation checkpointing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from memory_bench import spinlm_config  # noqa: E402
from spin_bench import _cpu_name, matmul_rates, write_task  # noqa: E402

MODES = {
    "32": ["trainer.precision=32"],
    "32-mkl": ["trainer.precision=32", "model.cpu_linear_kernel=default"],
    "bf16-mixed": ["trainer.precision=bf16-mixed"],
    "bf16": ["trainer.precision=bf16"],
    "bf16-ckpt": ["trainer.precision=bf16", "model.activations_checkpoint_granularity=full"],
}
WORKLOAD = dict(prompts=8, new_tokens=48, global_batch=8, micro_batch=4, max_length=256)


def build(model: Path, data: Path, mode: str, run_dir: Path):
    from spinlm.train import build_trainer

    return build_trainer(spinlm_config(model, data, run_dir, WORKLOAD, *MODES[mode]))


def time_steps(trainer, batch, steps: int) -> tuple[list[float], list[float]]:
    """Seconds of each whole train step, and of its optimizer step alone."""
    optimizer_s, step = [], trainer.optimizer.step

    def timed_step(*a, **k):
        t0 = time.perf_counter()
        out = step(*a, **k)
        optimizer_s.append(time.perf_counter() - t0)
        return out

    trainer.optimizer.step = timed_step
    totals = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.train_single_step(batch)
        totals.append(time.perf_counter() - t0)
    return totals, optimizer_s


def decoding_times(model_dir: Path, prompts: list[list[int]], rounds: int) -> dict[str, float]:
    """Fastest seconds to decode `prompts` (48 tokens each, no early stop) by the bf16-mixed reference as
    spinlm keeps it (linear layers bf16) and as an fp32 copy under the same autocast (a cast per weight per step)."""
    from spinlm.model.decoding import decode_batch
    from spinlm.model.loading import load_pretrained
    from spinlm.model.precision import frozen_copy, precision_of

    model, tokenizer = load_pretrained(model_dir)
    mixed = precision_of("bf16-mixed")
    references = {"fp32 copy + autocast": frozen_copy(model, precision_of("32")),
                  "compute-dtype copy + autocast": frozen_copy(model, mixed)}
    del model
    best = {name: float("inf") for name in references}
    for _ in range(rounds):
        for name, ref in references.items():
            t0 = time.perf_counter()
            with mixed.autocast("cpu"):
                decode_batch(ref, prompts, pad_id=tokenizer.pad_token_id, stop_ids=[tokenizer.eos_token_id],
                             max_new_tokens=WORKLOAD["new_tokens"], min_new_tokens=WORKLOAD["new_tokens"], greedy=True)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a Hugging Face model directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--rounds", type=int, default=2, help="rounds over all modes, alternating")
    p.add_argument("--steps", type=int, default=2, help="train steps per mode per round (after one warm-up step)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--out", default=None, help="write the JSON result here")
    args = p.parse_args(argv)

    from spinlm.model.prepare import prepare_model

    model = Path(args.model) if args.model else prepare_model()
    work = Path(tempfile.mkdtemp(prefix="precision-bench-"))
    data = write_task(work / "task", WORKLOAD["prompts"])
    modes = args.modes.split(",")
    fp32 = build(model, data, "32", work / "batch")  # the shared batch: answers sampled once, by fp32
    batch = next(fp32.augment_dataloader(0, 0))
    del fp32
    rates = {k: v / 1e9 for k, v in matmul_rates(repeats=5, bf16=True).items()}
    print("[precision_bench] matmul GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()), flush=True)
    steps: dict[str, list[float]] = {m: [] for m in modes}
    opt: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for mode in modes:
            trainer = build(model, data, mode, work / f"{mode}-{r}")
            trainer.train_single_step(batch)  # warm-up: kernel choice, optimizer state
            total, optimizer_s = time_steps(trainer, batch, args.steps)
            steps[mode] += total
            opt[mode] += optimizer_s
            print(f"[precision_bench] round {r + 1} {mode}: steps {', '.join(f'{t:.2f}' for t in total)} s "
                  f"(optimizer {', '.join(f'{t:.2f}' for t in optimizer_s)} s)", flush=True)
            del trainer
    decode = decoding_times(model, [batch["prompts_only"][i, :p].tolist()
                                    for i, p in enumerate(batch["prompt_lengths"].tolist())], args.rounds)
    print(f"[precision_bench] decoding (s): {decode}", flush=True)
    base = min(steps["32"]) if "32" in steps else None
    result = {
        "decoding_s": decode,
        "matmul_gflops": rates, "workload": WORKLOAD, "model": str(model), "cpu": _cpu_name(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "modes": {m: {"fastest_step_s": min(s), "median_step_s": statistics.median(s),
                      "fastest_optimizer_s": min(opt[m]), "speedup_vs_fp32": base / min(s) if base else None}
                  for m, s in steps.items()},
    }
    lines = ["| mode | fastest step (s) | median (s) | optimizer step (s) | speed vs `32` |", "|---|---:|---:|---:|---:|"]
    for m, v in result["modes"].items():
        speed = f"{v['speedup_vs_fp32']:.2f}x" if v["speedup_vs_fp32"] else "-"
        lines.append(f"| `{m}` | {v['fastest_step_s']:.2f} | {v['median_step_s']:.2f} | "
                     f"{v['fastest_optimizer_s']:.2f} | {speed} |")
    lines += ["", f"Reference decoding under bf16-mixed ({len(batch['prompt_lengths'])} prompts x "
              f"{WORKLOAD['new_tokens']} tokens, fastest of {args.rounds}): "
              + ", ".join(f"{k} {v:.2f} s" for k, v in decode.items())]
    result["markdown"] = "\n".join(lines)
    print(result["markdown"])
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
