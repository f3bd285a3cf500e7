"""RunLogger (metrics.jsonl, samples.jsonl, TensorBoard) and RunTimer."""

import json
import time

import pytest
import torch

from spinlm.utils.logger import RunLogger, RunTimer


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def logger(tmp_path):
    lg = RunLogger(tmp_path / "run", tensorboard=False)
    yield lg
    lg.close()


def test_log_metrics_one_json_object_per_call(logger):
    logger.log_metrics({"train/loss": 0.69, "train/acc": torch.tensor(0.5)}, step=1)
    logger.log_metrics({"train/loss": 0.5, "note": "x"}, step=2)
    rows = _rows(logger.metrics_path)
    assert logger.metrics_path == logger.run_dir / "metrics.jsonl"
    assert len(rows) == 2
    assert rows[0]["step"] == 1 and rows[1]["step"] == 2
    assert rows[0]["train/loss"] == pytest.approx(0.69)
    assert rows[0]["train/acc"] == 0.5 and isinstance(rows[0]["train/acc"], float)  # tensor -> number
    assert rows[1]["note"] == "x"
    assert "train/acc" not in rows[1]
    assert all(isinstance(r["time"], float) for r in rows)


def test_log_metrics_appends_across_loggers(tmp_path):
    a = RunLogger(tmp_path, tensorboard=False)
    a.log_metrics({"x": 1}, step=1)
    a.close()
    b = RunLogger(tmp_path, tensorboard=False)
    b.log_metrics({"x": 2}, step=2)
    b.close()
    assert [r["x"] for r in _rows(tmp_path / "metrics.jsonl")] == [1, 2]


def test_log_table_writes_rows(logger):
    rows = [{"prompt": "Hi | there", "response": "line1\nline2"}, {"prompt": "2+2?", "response": "4"}]
    logger.log_table("samples", rows, step=5)
    got = _rows(logger.samples_path)
    assert got == [{"step": 5, "table": "samples", **r} for r in rows]


def test_rewind_drops_later_rows(logger):
    for step in range(1, 6):
        logger.log_metrics({"loss": float(step)}, step=step)
        logger.log_table("samples", [{"prompt": f"p{step}", "response": "r"}], step=step)
    logger.rewind(3)
    assert [r["step"] for r in _rows(logger.metrics_path)] == [1, 2, 3]
    assert [r["prompt"] for r in _rows(logger.samples_path)] == ["p1", "p2", "p3"]
    # logging continues after the kept rows
    logger.log_metrics({"loss": 9.0}, step=4)
    assert [r["step"] for r in _rows(logger.metrics_path)] == [1, 2, 3, 4]
    logger.rewind(0)
    assert _rows(logger.metrics_path) == []
    assert _rows(logger.samples_path) == []


def test_rewind_without_files_is_a_no_op(tmp_path):
    lg = RunLogger(tmp_path, tensorboard=False)
    lg.rewind(10)
    assert not lg.metrics_path.exists() and not lg.samples_path.exists()


def test_rewind_survives_a_partial_last_line(logger):
    """A crash mid-append leaves half a line; the resume that follows must not die on it."""
    logger.log_metrics({"loss": 1.0}, step=1)
    logger.log_metrics({"loss": 2.0}, step=2)
    with open(logger.metrics_path, "a", encoding="utf-8") as f:
        f.write('{"step": 3, "time": 1.0, "lo')
    logger.rewind(2)
    assert [r["step"] for r in _rows(logger.metrics_path)] == [1, 2]


def test_tensorboard_event_file(tmp_path):
    lg = RunLogger(tmp_path / "run")
    lg.log_metrics({"train/loss": 0.5, "nan_metric": float("nan"), "text": "skip"}, step=1)
    lg.log_table("samples", [{"prompt": "a", "response": "b"}], step=1)
    lg.close()
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    assert events[0].stat().st_size > 0
    assert b"train/loss" in events[0].read_bytes()
    assert b"nan_metric" not in events[0].read_bytes()  # non-finite values are not sent to TensorBoard


def test_no_tensorboard_dir_when_disabled(tmp_path):
    RunLogger(tmp_path, tensorboard=False).close()
    assert not (tmp_path / "tensorboard").exists()


def test_run_timer_none_never_finishes():
    t = RunTimer(None)
    assert not t.is_finished()
    t.start()
    assert not t.is_finished()


def test_run_timer_zero_finishes_after_start():
    t = RunTimer(0)
    assert not t.is_finished()  # not started yet
    t.start()
    assert t.is_finished()


def test_run_timer_counts_from_start():
    t = RunTimer(0.05)
    t.start()
    assert not t.is_finished()
    time.sleep(0.06)
    assert t.is_finished()


def test_rewind_hides_redone_steps_in_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = RunLogger(tmp_path)
    for step in range(1, 6):
        logger.log_metrics({"train/loss": float(step)}, step)
    logger.rewind(2)
    for step in (3, 4):
        logger.log_metrics({"train/loss": 10.0 * step}, step)
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert scalars == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


class RecordingSink:
    def __init__(self):
        self.calls = []

    def log_metrics(self, scalars, step, wall_time):
        self.calls.append(("metrics", step, scalars))

    def log_table(self, name, rows, step):
        self.calls.append(("table", step, name, rows))

    def rewind(self, step, kept):
        self.calls.append(("rewind", step, list(kept.events())))

    def log_report(self, table, files):
        self.calls.append(("report", table, list(files)))

    def close(self):
        self.calls.append(("close",))


def test_sinks_get_the_scalars_tables_and_kept_rows(tmp_path):
    sink = RecordingSink()
    logger = RunLogger(tmp_path, tensorboard=False, sinks=[sink])
    logger.log_metrics({"train/loss": torch.tensor(0.5), "note": "x", "bad": float("inf"), "n": 3}, step=1)
    logger.log_table("samples", [{"prompt": "p", "response": "r"}], step=1)
    logger.log_metrics({"val/loss": 0.7}, step=1)  # logged after the table, replayed before it (a step's order)
    logger.log_metrics({"train/loss": 0.4}, step=2)
    logger.log_table("samples", [], step=2)  # nothing to show: not sent
    logger.rewind(1)
    logger.log_report([{"iteration": 1}], [tmp_path / "report.md"])
    logger.close()
    assert sink.calls[:4] == [
        ("metrics", 1, {"train/loss": 0.5, "n": 3}),  # finite numbers only, as TensorBoard
        ("table", 1, "samples", [{"prompt": "p", "response": "r"}]),
        ("metrics", 1, {"val/loss": 0.7}),
        ("metrics", 2, {"train/loss": 0.4}),
    ]
    kind, step, kept = sink.calls[4]
    assert (kind, step) == ("rewind", 1)
    assert [(s, k) for s, k, _ in kept] == [(1, "metrics"), (1, "metrics"), (1, "table")]
    assert kept[0][2][0] == {"train/loss": 0.5, "n": 3}
    assert kept[2][2] == ("samples", [{"prompt": "p", "response": "r"}])
    assert sink.calls[5:] == [("report", [{"iteration": 1}], [tmp_path / "report.md"]), ("close",)]


def test_ranks_other_than_zero_send_nothing_to_sinks(tmp_path):
    sink = RecordingSink()
    logger = RunLogger(tmp_path, tensorboard=False, active=False, sinks=[sink])
    logger.log_metrics({"train/loss": 0.5}, step=1)
    logger.log_table("samples", [{"prompt": "p"}], step=1)
    logger.rewind(0)
    logger.log_report([{"iteration": 1}])
    logger.close()
    assert sink.calls == [] and not logger.metrics_path.exists()
