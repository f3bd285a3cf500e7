"""Held-out evaluation before and after, side by side: SmolLM2-135M-Instruct, the bundled task's 100 test questions.

    python benchmarks/eval_speed.py [--repeats 3] [--out benchmarks/eval_speed.json]

before:     greedy answers in batches of 16, then the SFT loss by a second forward over prompt + answer
            (what `spinlm evaluate` and the trainer did before);
after_b16:  the same batches of 16 (`trainer.spin.eval_batch_size`'s default), the SFT loss scored in
            the decoding pass (each answer on its prompt's KV cache right after the prefill);
after:      the same, in batches of 64 (`spinlm evaluate`'s default).
Both run in this process on the same loaded model, alternating, `--repeats` times; each side's
fastest run counts (a shared machine only slows a run down). The script checks that every reply,
the accuracy and the SFT loss agree, and prints the loss difference (float rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SIDES = {"before": {"batch_size": 16, "loss_in_decoding": False},
         "after_b16": {"batch_size": 16, "loss_in_decoding": True},
         "after": {"batch_size": 64, "loss_in_decoding": True}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = parser.parse_args(argv)

    from spinlm.data.render import ChatRenderer
    from spinlm.data.tasks import write_task
    from spinlm.evaluation import evaluate, load_eval_items
    from spinlm.model.loading import load_model, load_tokenizer
    from spinlm.model.prepare import prepare_model

    model_dir = prepare_model()
    # the demo's task (`spinlm make-task runs/smollm2-task --test 100`): its test split
    task = write_task(ROOT / "runs" / "eval-speed-task", {"train": 1000, "validation": 100, "test": args.questions})
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, tokenizer)
    renderer = ChatRenderer(tokenizer)
    items = load_eval_items(task["test"], renderer, 512, 48)
    end_strings = list(dict.fromkeys(["<|endoftext|>", "<extra_id_1>", *renderer.end_strings]))
    seconds: dict[str, list[float]] = {side: [] for side in SIDES}
    results = {}
    for repeat in range(args.repeats):
        for side, kwargs in SIDES.items():
            t0 = time.perf_counter()
            results[side] = evaluate(model, tokenizer, items, end_strings, 48, show_progress=False, **kwargs)
            seconds[side].append(time.perf_counter() - t0)
            print(f"repeat {repeat} {side}: {seconds[side][-1]:.1f}s, {results[side].summary()[:60]}", flush=True)
    before = results["before"]
    replies = {side: [r["reply"] for r in res.records] for side, res in results.items()}
    figures = {
        "questions": len(items), "seconds": seconds,
        "best_s": {side: min(s) for side, s in seconds.items()},
        "speedup_vs_before": {side: min(seconds["before"]) / min(s) for side, s in seconds.items() if side != "before"},
        "identical_replies": {side: replies[side] == replies["before"] for side in results if side != "before"},
        "accuracy": {side: res.accuracy for side, res in results.items()},
        "sft_loss": {side: res.sft_loss for side, res in results.items()},
        "sft_loss_abs_diff": {side: abs(res.sft_loss - before.sft_loss) for side, res in results.items()
                              if side != "before"},
    }
    print("side       best s   speed-up   same replies   accuracy   SFT loss")
    for side in SIDES:
        print(f"{side:<10} {figures['best_s'][side]:7.1f}   {figures['speedup_vs_before'].get(side, 1.0):7.2f}x   "
              f"{str(figures['identical_replies'].get(side, True)):<13}  {100 * figures['accuracy'][side]:6.1f}%   "
              f"{figures['sft_loss'][side]:.6f}")
    print(json.dumps(figures, indent=1))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1) + "\n")
    ok = (all(figures["identical_replies"].values()) and len(set(figures["accuracy"].values())) == 1
          and max(figures["sft_loss_abs_diff"].values()) < 1e-5)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
