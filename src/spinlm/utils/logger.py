"""Run metrics: `metrics.jsonl` (one object per logged step) fanned out to sinks, plus text tables.

`metrics.jsonl` and `samples.jsonl` are the run's record: `spinlm report` reads them, and a resume
rewinds them to the checkpoint's step. Every other destination is a sink (TensorBoard here; Weights &
Biases and MLflow in `utils/trackers.py`) that receives the same scalars and tables. A resume that
rewinds hands each sink the kept rows: TensorBoard hides the later events, while a remote tracker,
which cannot delete rows, logs only the kept rows it lacks and then skips the steps it already holds.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

from spinlm.utils.checkpoint import atomic_write_text


class Sink(Protocol):
    """A destination for the run's scalars and tables (rank 0 only)."""

    def log_metrics(self, scalars: dict[str, float], step: int, wall_time: float) -> None: ...

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None: ...

    def rewind(self, step: int, kept: "KeptRows") -> None:
        """The run goes back to `step`; `kept` holds the record's rows up to it."""

    def log_report(self, table: list[dict[str, Any]], files: Sequence[Path]) -> None:
        """The per-iteration table of `spinlm report` and its files, at the end of a run."""

    def close(self) -> None: ...


class RunLogger:
    """Appends metrics to the run directory and fans them out to sinks; on resume, rows after the
    checkpoint's step are dropped.

    `active=False` (ranks other than 0 of a multi-process run) writes nothing: one writer per run."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, active: bool = True,
                 sinks: Sequence[Sink] = ()):
        self.run_dir = Path(run_dir)
        self.active = active
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.samples_path = self.run_dir / "samples.jsonl"
        self.sinks: list[Sink] = []
        if active:
            self.sinks = ([TensorBoardSink(self.run_dir / "tensorboard")] if tensorboard else []) + list(sinks)

    def rewind(self, step: int) -> None:
        """Forget rows logged after `step` (they belong to work a resume will redo); -1 forgets all."""
        if not self.active:
            return
        for path in (self.metrics_path, self.samples_path):
            if not path.exists():
                continue
            rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            kept = [line for line in rows if _row_step(line) <= step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))  # a kill here loses nothing
        kept_rows = KeptRows(self.metrics_path, self.samples_path)
        for sink in self.sinks:
            sink.rewind(step, kept_rows)

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        if not self.active:
            return
        row = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        for sink in self.sinks:
            sink.log_metrics(scalars(row), step, row["time"])

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        if not self.active:
            return
        with open(self.samples_path, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({"step": step, "table": name, **row}) + "\n")
        if rows:
            for sink in self.sinks:
                sink.log_table(name, rows, step)

    def log_report(self, table: list[dict[str, Any]], files: Sequence[Path] = ()) -> None:
        """Hand `spinlm report`'s per-iteration table (and report.md / report.png) to the sinks."""
        if self.active:
            for sink in self.sinks:
                sink.log_report(table, files)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []


class KeptRows:
    """The record's rows after a rewind, read on demand (TensorBoard never needs them)."""

    def __init__(self, metrics_path: Path, samples_path: Path):
        self.metrics_path, self.samples_path = metrics_path, samples_path

    def events(self) -> Iterator[tuple[int, str, Any]]:
        """('metrics', scalars) and ('table', (name, rows)) in step order, as they were logged."""
        metrics = [(r["step"], "metrics", (scalars(r), r.get("time", 0.0))) for r in read_jsonl(self.metrics_path)]
        tables: dict[tuple[int, str], list[dict]] = {}
        for r in read_jsonl(self.samples_path):
            row = {k: v for k, v in r.items() if k not in ("step", "table")}
            tables.setdefault((r["step"], r["table"]), []).append(row)
        table_events = [(step, "table", (name, rows)) for (step, name), rows in tables.items()]
        # a step's tables were logged after its metrics (validation ends a step); sorted() is stable
        yield from sorted(metrics + table_events, key=lambda e: (e[0], e[1] == "table"))


class TensorBoardSink:
    """Scalars and markdown tables in `RUN_DIR/tensorboard`; a rewind hides the events of redone steps."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self._writer = self._open()

    def _open(self, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    def log_metrics(self, scalars: dict[str, float], step: int, wall_time: float) -> None:
        for key, value in scalars.items():
            self._writer.add_scalar(key, value, step)

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        self._writer.add_text(name, markdown(rows), step)

    def rewind(self, step: int, kept: KeptRows) -> None:
        self._writer.close()
        self._writer = self._open(purge_step=step + 1)

    def log_report(self, table: list[dict[str, Any]], files: Sequence[Path]) -> None:
        pass  # the report sits beside the event files, in the run directory

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The values of a metrics row that every sink plots: finite numbers, without step and time."""
    return {k: v for k, v in row.items()
            if k not in ("step", "time") and isinstance(v, (int, float)) and math.isfinite(v)}


def markdown(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])
    md = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    return md + "".join("| " + " | ".join(_cell(r.get(c)) for c in cols) + " |\n" for r in rows)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a run's JSONL file (none when it is missing), without a last line a crash cut short."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if _step(row) != math.inf:  # not a row at all (the file is data from the run directory)
            rows.append(row)
    return rows


def _row_step(line: str) -> float:
    """A row's step; a line cut short by a crash mid-append (or not a row at all) is dropped (inf)."""
    try:
        return _step(json.loads(line))
    except ValueError:
        return math.inf


def _step(row: Any) -> float:
    step = row.get("step", 0) if isinstance(row, dict) else None
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else math.inf


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
