"""Metrics to `metrics.jsonl` (one object per logged step) and to TensorBoard, plus text tables."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from spinlm.utils.checkpoint import atomic_write_text


class RunLogger:
    """Appends metrics to the run directory; on resume, rows after the checkpoint's step are dropped.

    `active=False` (ranks other than 0 of a multi-process run) writes nothing: one writer per run."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, active: bool = True):
        self.run_dir = Path(run_dir)
        self.active = active
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.samples_path = self.run_dir / "samples.jsonl"
        self._tb = self._writer() if tensorboard and active else None

    def _writer(self, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge_step)

    def rewind(self, step: int) -> None:
        """Forget rows logged after `step` (they belong to work a resume will redo)."""
        if not self.active:
            return
        for path in (self.metrics_path, self.samples_path):
            if not path.exists():
                continue
            rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            kept = [line for line in rows if _row_step(line) <= step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))  # a kill here loses nothing
        if self._tb is not None:  # TensorBoard hides the events of the steps that will be redone
            self._tb.close()
            self._tb = self._writer(purge_step=step + 1)

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        if not self.active:
            return
        row = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        if not self.active:
            return
        with open(self.samples_path, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({"step": step, "table": name, **row}) + "\n")
        if self._tb is not None and rows:
            cols = list(rows[0])
            md = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
            md += "".join("| " + " | ".join(_cell(r[c]) for c in cols) + " |\n" for r in rows)
            self._tb.add_text(name, md, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def _row_step(line: str) -> float:
    """A row's step; a line cut short by a crash mid-append is unreadable and is dropped (inf)."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return math.inf


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", "<br>")


class RunTimer:
    """Wall-clock budget for one run (NeMo's max_time_per_run); None means unlimited."""

    def __init__(self, max_seconds: float | None):
        self.max_seconds = max_seconds
        self._start: float | None = None

    def start(self) -> None:
        self._start = time.monotonic()

    def is_finished(self) -> bool:
        if self.max_seconds is None or self._start is None:
            return False
        return time.monotonic() - self._start >= self.max_seconds
