"""W&B (offline files, read back) and MLflow (file store, read back with MlflowClient) sinks: the same
scalars and tables as metrics.jsonl, one remote run across a resume, each step once; a kill and a
resume of a real training run; the one-line errors. Needs `pip install -e '.[loggers]'`."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from spinlm.utils.logger import RunLogger
from spinlm.utils.trackers import TRACKERS_FILE, MlflowSink, WandbSink, _records, offline_history


@pytest.fixture
def wandb_offline(monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture
def mlflow_store(monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the sink sets it; monkeypatch restores it after


def _stored(run_dir, tracker):
    path = run_dir / TRACKERS_FILE
    return json.loads(path.read_text())[tracker] if path.exists() else {}


def _wandb(run_dir, resuming):
    return WandbSink({"project": "spinlm-test"}, "run", run_dir, {"model": {"seed": 1}},
                     _stored(run_dir, "wandb") if resuming else {})


def _mlflow(run_dir, resuming):
    return MlflowSink({}, "run", run_dir, {"model": {"seed": 1}}, _stored(run_dir, "mlflow") if resuming else {})


def _log_steps(logger, steps, scale=1.0, table_every=2):
    for step in steps:
        logger.log_metrics({"train/loss": scale * step, "note": "text is not a scalar"}, step)
        if step % table_every == 0:
            logger.log_metrics({"val/loss": scale * step / 10}, step)
            logger.log_table("train/generations", [{"prompt": f"p{step}", "response": "r"}], step)


def _mlflow_history(run_dir, key):
    from mlflow.tracking import MlflowClient

    ids = _stored(run_dir, "mlflow")
    client = MlflowClient(tracking_uri=ids["tracking_uri"])
    return [(m.step, m.value) for m in sorted(client.get_metric_history(ids["run_id"], key), key=lambda m: m.step)]


# ----- W&B -----------------------------------------------------------------------------------------


def test_wandb_resume_skips_the_steps_the_run_holds(tmp_path, wandb_offline):
    """Session 1 logged steps 1..5; the checkpoint was at 3. Session 2 redoes 4..5 (skipped: W&B has
    them) and goes on to 8, in the same run id."""
    logger = RunLogger(tmp_path, tensorboard=False, sinks=[_wandb(tmp_path, resuming=False)])
    logger.rewind(-1)
    _log_steps(logger, range(1, 6))
    logger.close()
    run_id = _stored(tmp_path, "wandb")["id"]

    logger = RunLogger(tmp_path, tensorboard=False, sinks=[_wandb(tmp_path, resuming=True)])
    logger.rewind(3)
    _log_steps(logger, range(4, 9), scale=10.0)  # values that show which session a step came from
    logger.close()

    assert _stored(tmp_path, "wandb")["id"] == run_id
    rows = offline_history(tmp_path, run_id)
    assert [r["_step"] for r in rows] == list(range(1, 9))
    assert [r["train/loss"] for r in rows] == [1, 2, 3, 4, 5, 60, 70, 80]
    assert [r["_step"] for r in rows if "val/loss" in r] == [2, 4, 6, 8]
    assert [r["_step"] for r in rows if r.get("train/generations._type") == "table-file"] == [2, 4, 6, 8]
    assert not any("note" in r for r in rows)  # strings are not scalars (as in TensorBoard)


def _wandb_session_one(run_dir, steps):
    logger = RunLogger(run_dir, tensorboard=False, sinks=[_wandb(run_dir, resuming=False)])
    logger.rewind(-1)
    _log_steps(logger, steps)
    logger.close()
    run_id = _stored(run_dir, "wandb")["id"]
    (path,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    return run_id, path


@pytest.mark.parametrize("kept_fraction", [0.0, 0.5, 1.0])
def test_wandb_replays_the_steps_a_kill_lost(tmp_path, wandb_offline, kept_fraction):
    """W&B buffers its offline file and a kill loses the tail (often all of a short session). The
    resume sends the kept rows of metrics.jsonl the file lacks, then the new steps: each step once."""
    run_id, path = _wandb_session_one(tmp_path, range(1, 7))
    data = path.read_bytes()
    path.write_bytes(data[:max(7, int(len(data) * kept_fraction))])  # 7: W&B's header only
    held = [r["_step"] for r in offline_history(tmp_path, run_id)]
    assert held == list(range(1, len(held) + 1))
    assert (held == []) if kept_fraction == 0.0 else (held == list(range(1, 7))) if kept_fraction == 1.0 else True

    logger = RunLogger(tmp_path, tensorboard=False, sinks=[_wandb(tmp_path, resuming=True)])
    logger.rewind(4)  # the checkpoint: the record keeps steps 1..4
    _log_steps(logger, range(5, 9), scale=10.0)
    logger.close()
    rows = offline_history(tmp_path, run_id)
    first_session = max(len(held), 4)  # held by the file, or replayed from the record
    assert [r["_step"] for r in rows] == list(range(1, 9))
    assert [r["train/loss"] for r in rows] == [s if s <= first_session else 10 * s for s in range(1, 9)]
    assert [r["_step"] for r in rows if "val/loss" in r] == [2, 4, 6, 8]


def test_wandb_file_cut_anywhere_reads_as_a_prefix(tmp_path, wandb_offline):
    run_id, path = _wandb_session_one(tmp_path, range(1, 7))
    data = path.read_bytes()
    for cut in range(0, len(data), 7):
        path.write_bytes(data[:cut])
        steps = [r["_step"] for r in offline_history(tmp_path, run_id)]
        assert steps == list(range(1, len(steps) + 1)), cut


def test_wandb_fresh_start_opens_a_new_run(tmp_path, wandb_offline):
    for _ in range(2):
        logger = RunLogger(tmp_path, tensorboard=False, sinks=[_wandb(tmp_path, resuming=False)])
        logger.rewind(-1)
        _log_steps(logger, range(1, 3))
        logger.close()
    runs = {p.name.rsplit("-", 1)[1] for p in (tmp_path / "wandb").glob("offline-run-*")}
    assert len(runs) == 2
    assert [r["_step"] for r in offline_history(tmp_path, _stored(tmp_path, "wandb")["id"])] == [1, 2]


# ----- MLflow --------------------------------------------------------------------------------------


def test_mlflow_resume_logs_each_step_once(tmp_path, mlflow_store):
    """Session 1 logged 1..5 and half of step 6 (killed inside a batch); checkpoint at 3. Session 2
    logs what each metric lacks: val/loss of step 6 and everything after."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    sink = _mlflow(tmp_path, resuming=False)
    logger = RunLogger(tmp_path, tensorboard=False, sinks=[sink])
    logger.rewind(-1)
    _log_steps(logger, range(1, 6))
    sink.client.log_batch(sink.run_id, metrics=[Metric("train/loss", 6.0, 0, 6)])  # the kill's half step
    run_id = sink.run_id  # no close(): a killed run is never terminated

    logger = RunLogger(tmp_path, tensorboard=False, sinks=[_mlflow(tmp_path, resuming=True)])
    logger.rewind(3)
    _log_steps(logger, range(4, 9), scale=10.0)
    logger.close()

    assert _stored(tmp_path, "mlflow")["run_id"] == run_id
    assert _mlflow_history(tmp_path, "train/loss") == [(s, float(s)) for s in range(1, 7)] + [(7, 70.0), (8, 80.0)]
    assert _mlflow_history(tmp_path, "val/loss") == [(2, 0.2), (4, 0.4), (6, 6.0), (8, 8.0)]
    client = MlflowClient(tracking_uri=_stored(tmp_path, "mlflow")["tracking_uri"])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["model.seed"] == "1" and "note" not in run.data.metrics
    tables = sorted(a.path for a in client.list_artifacts(run_id, "tables/train/generations"))
    assert tables == [f"tables/train/generations/step_{s:06d}.json" for s in (2, 4, 6, 8)]
    assert str(tmp_path / "mlruns") in _stored(tmp_path, "mlflow")["tracking_uri"]  # the run directory's store


def test_mlflow_report_table_and_files(tmp_path, mlflow_store):
    sink = _mlflow(tmp_path, resuming=False)
    (tmp_path / "report.md").write_text("# report\n")
    logger = RunLogger(tmp_path, tensorboard=False, sinks=[sink])
    logger.log_report([{"iteration": 0, "accuracy": 0.1}, {"iteration": 1, "accuracy": 0.3}], [tmp_path / "report.md"])
    logger.close()
    local = sink.client.download_artifacts(sink.run_id, "report", str(tmp_path / "dl"))
    table = json.loads((tmp_path / "dl" / "report" / "iterations.json").read_text())
    assert table == {"columns": ["iteration", "accuracy"], "data": [[0, 0.1], [1, 0.3]]}
    assert (tmp_path / "dl" / "report" / "report.md").read_text() == "# report\n" and local


# ----- a real run: kill -9, resume, each step once in both trackers ---------------------------------


def _train_args(model_dir, files, run_dir):
    train, val = files
    return [
        f"pretrained_checkpoint.restore_from_path={model_dir}",
        f"model.data.train_ds.file_path={train}", f"model.data.validation_ds.file_path={val}",
        f"exp_manager.explicit_log_dir={run_dir}", "trainer.precision=32",
        "trainer.spin.max_iterations=2", "trainer.spin.max_epochs=1", "trainer.spin.limit_train_batches=3",
        "trainer.spin.val_check_interval=1", "trainer.spin.save_interval=2",  # 6 steps; saves at 2, 4, 6
        "model.global_batch_size=4", "model.micro_batch_size=2", "model.encoder_seq_length=128",
        "model.spin.length_params.max_length=16", "model.optim.sched.name=Constant",
        "model.optim.sched.warmup_steps=0", "model.optim.lr=1e-3",
        "exp_manager.create_wandb_logger=true", "exp_manager.wandb_logger_kwargs.project=spinlm-test",
        "exp_manager.create_mlflow_logger=true",
    ]


def _train_losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


def test_kill_and_resume_keep_each_step_once_in_wandb_and_mlflow(tmp_path, tiny_model_dir, chat_files,
                                                                  wandb_offline, mlflow_store):
    from spinlm.config import load_config
    from spinlm.train import run

    run_dir = tmp_path / "run"
    args = _train_args(tiny_model_dir, chat_files, run_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("SPINLM_DEBUG", None)
    proc = subprocess.Popen([sys.executable, "-m", "spinlm", "train", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not ((run_dir / "metrics.jsonl").exists() and len(_train_losses(run_dir)) >= 3):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # after step 3: checkpoint 2 exists, step 3 is logged past it
    proc.wait(timeout=60)
    proc.stderr.close()
    assert not (run_dir / "final").exists()

    run(load_config(args))  # the resume, to the end

    expected = _train_losses(run_dir)
    assert [s for s, _ in expected] == [1, 2, 3, 4, 5, 6]
    wandb_rows = [r for r in offline_history(run_dir, _stored(run_dir, "wandb")["id"]) if "train/loss" in r]
    assert [(r["_step"], r["train/loss"]) for r in wandb_rows] == expected
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2  # two sessions, one run id
    summary = {item.key or ".".join(item.nested_key): json.loads(item.value_json)
               for path in (run_dir / "wandb").glob("offline-run-*/*.wandb")
               for record in _records(path) if record.HasField("summary") for item in record.summary.update}
    assert summary["report/iterations"]["_type"] == "table-file"  # spinlm report's table, at the end
    assert _mlflow_history(run_dir, "train/loss") == expected
    assert [s for s, _ in _mlflow_history(run_dir, "val/loss")] == [1, 2, 3, 4, 5, 6]
