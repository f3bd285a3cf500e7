"""`spinlm report RUN_DIR`: plots and a per-iteration table of a run, from its `metrics.jsonl`.

Writes `RUN_DIR/report.png` (training loss, reward accuracy, rewards and their margin, generated
answer length over steps; held-out accuracy and SFT loss per iteration) and `RUN_DIR/report.md`
(the per-iteration table, held-out accuracy per skill, the main settings), and returns the table.
`spinlm train` calls it at the end of a run. Iteration 0 is the start model; iteration N is the
policy after N SPIN iterations, and its train columns describe iteration N's training.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from spinlm.errors import DataError
from spinlm.utils.checkpoint import atomic_write_text
from spinlm.utils.logger import read_jsonl
from spinlm.utils.rundir import RUN_CONFIG, lookup, read_run_config, refuse_links_out

TABLE_COLUMNS = (
    ("iteration", "iteration"), ("held-out acc", "accuracy"), ("held-out SFT loss", "sft_loss"),
    ("'answer is' style", "answer_style"), ("train/acc", "train_acc"), ("mean reward margin", "reward_margin"),
    ("generation s", "generation_s"), ("ref log-probs s", "ref_logprobs_s"), ("train steps s", "train_s"),
    ("eval s", "eval_s"),
)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path}:0: file not found (is {run_dir} a spinlm run directory?)")
    return read_jsonl(path)


def iteration_rows(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One dict per iteration (0 = start model) with the held-out figures and that iteration's training."""
    evals = {int(r["eval/iteration"]): r for r in metrics if "eval/accuracy" in r}
    train: dict[int, list[dict]] = defaultdict(list)
    for r in metrics:
        if "train/loss" in r:
            train[int(r["train/iteration"]) + 1].append(r)
    rows = []
    for n in sorted(set(evals) | set(train)):
        ev, steps = evals.get(n, {}), train.get(n, [])
        rows.append({
            "iteration": n,
            "accuracy": ev.get("eval/accuracy"),
            "sft_loss": ev.get("eval/sft_loss"),
            "answer_style": ev.get("eval/answer_style"),
            "train_acc": _mean(steps, "train/acc"),
            "reward_margin": _mean(steps, "train/reward_margin_mean"),
            "generation_s": _sum(steps, "timing/generation_s"),
            "ref_logprobs_s": _sum(steps, "timing/ref_logprobs_s"),
            "train_s": _sum(steps, "timing/train_step_s"),
            "eval_s": ev.get("timing/eval_s"),
        })
    return rows


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return sum(values) / len(values) if values else None


def _sum(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return sum(values) if values else None


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key in ("accuracy", "answer_style", "train_acc"):
        return f"{value:.1%}"
    if key.endswith("_s"):
        return f"{value:.0f}" if value >= 10 else f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def iteration_table(rows: list[dict[str, Any]]) -> str:
    return markdown_table([h for h, _ in TABLE_COLUMNS], [[_fmt(k, r[k]) for _, k in TABLE_COLUMNS] for r in rows])


def skill_table(eval_dir: Path) -> str | None:
    """Held-out accuracy per skill and iteration, from the evaluation's `iter_N.jsonl` answers."""
    files = sorted(eval_dir.glob("iter_*.jsonl"), key=lambda p: int(p.stem.split("_")[1]))
    if not files:
        return None
    counts: dict[str, dict[int, list[int]]] = defaultdict(dict)
    for f in files:
        n = int(f.stem.split("_")[1])
        for line in f.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            c = counts[r.get("skill") or "-"].setdefault(n, [0, 0])
            c[0] += int(r["correct"])
            c[1] += 1
    iterations = [int(f.stem.split("_")[1]) for f in files]
    header = ["skill"] + [f"iter {n}" if n else "start" for n in iterations]
    body = [[skill] + [f"{by[n][0]}/{by[n][1]}" if n in by else "-" for n in iterations]
            for skill, by in sorted(counts.items())]
    return markdown_table(header, body)


def _settings(cfg: dict[str, Any]) -> str:
    keys = ["pretrained_checkpoint.restore_from_path", "model.optim.lr", "model.optim.sched.name",
            "model.cpu_linear_kernel",
            "model.spin.ref_policy_kl_penalty", "model.global_batch_size", "trainer.spin.limit_train_batches",
            "trainer.spin.max_iterations", "trainer.spin.max_epochs", "model.spin.sampling_params.temperature",
            "model.spin.length_params.max_length", "trainer.precision", "model.seed", "model.data.test_ds.file_path"]
    lines = [f"- `{k}`: {lookup(cfg, k)}" for k in keys if lookup(cfg, k, default="?") != "?"]
    return "\n".join(lines)


def plot(metrics: list[dict[str, Any]], rows: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    train = [r for r in metrics if "train/loss" in r]
    steps = [r["step"] for r in train]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    panels = [
        (axes[0, 0], "training loss", [("train/loss", "loss")]),
        (axes[0, 1], "reward accuracy (actual > generated)", [("train/acc", "train/acc")]),
        (axes[0, 2], "rewards (beta x log-ratio)", [("train/rewards_actual_mean", "ground truth"),
                                                    ("train/rewards_generated_mean", "generated"),
                                                    ("train/reward_margin_mean", "margin")]),
        (axes[1, 0], "generated answer length (tokens)", [("train/avg_generated_lengths", "mean length")]),
    ]
    boundaries = [a["step"] for a, b in zip(train, train[1:])  # the last step of each iteration but the last
                  if a["step"] > 0 and a.get("train/iteration") is not None
                  and a.get("train/iteration") != b.get("train/iteration")]
    for ax, title, series in panels:
        for key, label in series:
            ys = [r.get(key, math.nan) for r in train]
            ax.plot(steps, ys, marker="." if len(steps) < 50 else None, label=label)
        for b in boundaries:
            ax.axvline(b, color="grey", linestyle=":", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(series) > 1:
            ax.legend(fontsize=8)
    evals = [r for r in rows if r["accuracy"] is not None]
    its = [r["iteration"] for r in evals]
    for ax, key, title in ((axes[1, 1], "accuracy", "held-out accuracy (greedy, exact match)"),
                           (axes[1, 2], "sft_loss", "held-out SFT loss (ground-truth NLL/token)")):
        ax.plot(its, [r[key] for r in evals], marker="o")
        for x, r in zip(its, evals):
            ax.annotate(_fmt(key, r[key]), (x, r[key]), textcoords="offset points", xytext=(0, 6), ha="center")
        ax.set_title(title)
        ax.set_xlabel("SPIN iteration (0 = start model)")
        ax.set_xticks(its)
        ax.margins(x=0.1, y=0.2)
        if key == "accuracy":
            style = [r["answer_style"] for r in evals]
            if all(v is not None for v in style):
                ax.plot(its, style, linestyle="--", marker="x", color="grey", label="replies saying 'answer is'")
                ax.plot([], [], marker="o", color="C0", label="exact-match accuracy")
                ax.legend(fontsize=8)
            ax.set_ylim(0, 1.05)
            ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    fig.suptitle("SPIN run: dotted lines mark iteration ends")
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, dpi=100, format=out.suffix.lstrip(".") or "png")
    plt.close(fig)
    os.replace(tmp, out)  # replaces a link at `out` instead of writing through it
    return out


def write_report(run_dir: str | Path) -> str:
    """Write report.png and report.md into the run directory; returns the per-iteration table."""
    run_dir = Path(run_dir)
    refuse_links_out(run_dir, "report")  # it writes report.png / report.md there
    metrics = read_metrics(run_dir)
    rows = iteration_rows(metrics)
    if not rows:
        raise DataError(f"{run_dir / 'metrics.jsonl'}:0: no training or evaluation rows to report")
    table = iteration_table(rows)
    plot(metrics, rows, run_dir / "report.png")
    # the run's config.yaml as plain data: a foreign ${oc.env:...} is shown, never resolved
    cfg = read_run_config(run_dir) if (run_dir / RUN_CONFIG).is_file() else {}
    name = lookup(cfg, "exp_manager.name")
    parts = [f"# SPIN run report: {f'{name} in ' if name else ''}{run_dir}", "", "![report](report.png)", "",
             "## Per iteration", "",
             "Iteration 0 is the start model; iteration N is the policy after N SPIN iterations. Train columns "
             "(reward accuracy, margin = beta x (log-ratio of the ground truth - of the generated answer)) and "
             "phase times describe iteration N's training.", "", table]
    skills = skill_table(run_dir / "eval")
    if skills:
        parts += ["", "## Held-out accuracy per skill", "", skills]
    settings = _settings(cfg)
    if settings:
        parts += ["", "## Settings", "", settings]
    atomic_write_text(run_dir / "report.md", "\n".join(parts) + "\n")
    return table
