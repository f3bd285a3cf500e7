"""Weights & Biases and MLflow sinks for `RunLogger` (NeMo's `exp_manager.create_wandb_logger` /
`create_mlflow_logger` with their `*_logger_kwargs`).

Rank 0 only. Each tracker keeps its remote run's id in `RUN_DIR/trackers.json`, so a run resumed
from a checkpoint logs into the same remote run; a run that starts from scratch opens a new one.
A tracker cannot delete rows, and a kill can lose what it had buffered, so on a resume it asks its
own store what it holds, logs the kept rows of `metrics.jsonl` it lacks, and then skips the steps
it already has: every step reaches it once.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import uuid
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Iterator, Sequence

from omegaconf import DictConfig, OmegaConf

from spinlm.errors import ConfigError, SpinlmError
from spinlm.utils.checkpoint import atomic_write_text
from spinlm.utils.logger import KeptRows, Sink

log = logging.getLogger(__name__)

TRACKERS_FILE = "trackers.json"  # {"wandb": {"id": ...}, "mlflow": {"run_id": ..., "tracking_uri": ...}}
INSTALL = "pip install 'spinlm[loggers]'"
PACKAGES = {"create_wandb_logger": "wandb", "create_mlflow_logger": "mlflow"}


def check_trackers(cfg: DictConfig) -> None:
    """Before anything loads: the package of each tracker asked for is installed; W&B tags are strings."""
    em = cfg.exp_manager
    for key, package in PACKAGES.items():
        if em[key] and find_spec(package) is None:
            raise ConfigError(f"config: exp_manager.{key}=true needs the {package} package: {INSTALL}")
    tags = em.wandb_logger_kwargs.tags
    if tags is not None and not all(isinstance(t, str) for t in tags):
        raise ConfigError(f"config: exp_manager.wandb_logger_kwargs.tags must be a list of strings, got {list(tags)}")
    mlflow_tags = OmegaConf.to_container(em.mlflow_logger_kwargs.tags) if em.mlflow_logger_kwargs.tags else {}
    if any(isinstance(v, (dict, list)) for v in mlflow_tags.values()):
        raise ConfigError("config: exp_manager.mlflow_logger_kwargs.tags must map names to plain values")


def build_trackers(cfg: DictConfig, run_dir: Path, resuming: bool) -> list[Sink]:
    """The trackers the config asks for. `resuming`: continue the remote runs kept in trackers.json."""
    em = cfg.exp_manager
    config = OmegaConf.to_container(cfg, resolve=True)
    stored = _stored(run_dir) if resuming else {}
    sinks: list[Sink] = []
    for key, tracker, cls in (("wandb", "W&B", WandbSink), ("mlflow", "MLflow", MlflowSink)):
        if not em[f"create_{key}_logger"]:
            continue
        try:
            sinks.append(cls(_kwargs(em[f"{key}_logger_kwargs"]), em.name, run_dir, config, stored.get(key, {})))
        except SpinlmError:
            raise
        except Exception as e:  # e.g. not logged in, server unreachable: one line, not a traceback
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"config: exp_manager.create_{key}_logger: {tracker} could not open the run: {first}") \
                from e
    return sinks


class WandbSink:
    """Scalars and tables into a W&B run (online, or offline files under `save_dir/wandb/`).

    What the run already holds comes from the W&B server (a resumed run's starting step) or, offline,
    from the earlier sessions' offline-run files: each session of an offline run writes its own
    `offline-run-*-ID` directory, and together they hold each step once."""

    def __init__(self, kwargs: dict[str, Any], default_name: str, run_dir: Path, config: dict, stored: dict):
        import wandb

        self.wandb = wandb
        save_dir = Path(kwargs.pop("save_dir", None) or run_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        run_id = kwargs.pop("id", None) or stored.get("id") or uuid.uuid4().hex[:8]  # W&B's id alphabet
        offline = kwargs.pop("offline", False)
        earlier = offline_history(save_dir, run_id)  # read before this session adds its own files
        self.run = wandb.init(id=run_id, dir=str(save_dir), resume="allow", mode="offline" if offline else None,
                              name=kwargs.pop("name", None) or default_name, **kwargs)
        self.run.config.update(config, allow_val_change=True)  # a resume may change e.g. trainer.max_time
        if self.run.offline:
            self.held = max((row["_step"] for row in earlier), default=-1)
        else:
            self.held = self.run.starting_step - 1
        _store(run_dir, "wandb", {"id": run_id})
        log.info("W&B run %s (%s)%s", run_id, "offline" if self.run.offline else "online",
                 f": it holds steps up to {self.held}" if self.held >= 0 else "")

    def log_metrics(self, scalars: dict[str, float], step: int, wall_time: float) -> None:
        if step > self.held and scalars:
            self.run.log(scalars, step=step)

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        if step > self.held:
            self.run.log({name: self._table(rows)}, step=step)

    def rewind(self, step: int, kept: KeptRows) -> None:
        _replay(self, kept, after=self.held)

    def log_report(self, table: list[dict[str, Any]], files: Sequence[Path]) -> None:
        if table:
            self.run.summary["report/iterations"] = self._table(table)
        for path in files:
            self.run.save(str(path), base_path=str(path.parent), policy="now")

    def close(self) -> None:
        self.run.finish()
        self.wandb.teardown()  # waits until W&B has written its files (finish alone may return first)

    def _table(self, rows: list[dict[str, Any]]):
        return self.wandb.Table(**columns(rows))


class MlflowSink:
    """Scalars, tables (JSON artifacts `tables/NAME/step_N.json`) and the config into an MLflow run.

    MLflow keeps every value logged, so a metric is skipped at the steps its history already holds."""

    def __init__(self, kwargs: dict[str, Any], default_name: str, run_dir: Path, config: dict, stored: dict):
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self.Metric = Metric
        uri = kwargs.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") \
            or Path(kwargs.get("save_dir") or run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # asked for by the user; MLflow 3 wants the opt-in
        self.client = MlflowClient(tracking_uri=uri)
        run_id = kwargs.get("run_id") or (stored.get("run_id") if stored.get("tracking_uri") == uri else None)
        self.run_id = (run_id and self._reopen(run_id, given=bool(kwargs.get("run_id")))) \
            or self._create(kwargs, default_name, config, Param)
        self.held = self._held_steps()
        self.held_tables: dict[str, set[str]] = {}
        self.client.log_dict(self.run_id, config, "config.json")
        _store(run_dir, "mlflow", {"run_id": self.run_id, "tracking_uri": uri})
        log.info("MLflow run %s at %s", self.run_id, uri)

    def _create(self, kwargs: dict[str, Any], default_name: str, config: dict, Param) -> str:
        name = kwargs.get("experiment_name") or default_name
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else \
            self.client.create_experiment(name, artifact_location=kwargs.get("artifact_location"))
        run = self.client.create_run(experiment_id, run_name=kwargs.get("run_name") or default_name,
                                     tags=dict(kwargs.get("tags") or {}))
        params = [Param(k, str(v)[:6000]) for k, v in _flatten(config).items()]  # MLflow's value limit
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run.info.run_id, params=params[i:i + 100])
        return run.info.run_id

    def _reopen(self, run_id: str, given: bool) -> str | None:
        """The run to continue; a run kept in trackers.json that the store no longer has: None (a new run)."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException as e:
            if given:
                raise ConfigError(f"config: exp_manager.mlflow_logger_kwargs.run_id: no MLflow run {run_id} in "
                                  f"this store ({str(e).splitlines()[0]})") from e
            log.warning("MLflow run %s (from %s) is not in the store: starting a new run", run_id, TRACKERS_FILE)
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def _held_steps(self) -> dict[str, int]:
        """Each metric's last step in the run (logging is in step order, so it holds every step up to it)."""
        keys = self.client.get_run(self.run_id).data.metrics
        return {k: max(m.step for m in self.client.get_metric_history(self.run_id, k)) for k in keys}

    def log_metrics(self, scalars: dict[str, float], step: int, wall_time: float) -> None:
        ms = int(wall_time * 1000)
        metrics = [self.Metric(k, v, ms, step) for k, v in scalars.items() if step > self.held.get(k, -1)]
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        path = f"tables/{name}/step_{step:06d}.json"  # one artifact per step
        if name not in self.held_tables:  # the steps whose table the run holds, listed once per table
            self.held_tables[name] = {a.path for a in self.client.list_artifacts(self.run_id, f"tables/{name}")}
        if path not in self.held_tables[name]:
            self.client.log_dict(self.run_id, columns(rows), path)

    def rewind(self, step: int, kept: KeptRows) -> None:
        _replay(self, kept, after=-1)  # log_metrics skips each metric's held steps

    def log_report(self, table: list[dict[str, Any]], files: Sequence[Path]) -> None:
        if table:
            self.client.log_dict(self.run_id, columns(table), "report/iterations.json")
        for path in files:
            self.client.log_artifact(self.run_id, str(path), "report")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _replay(sink: Sink, kept: KeptRows, after: int) -> None:
    """Send a resumed tracker the kept rows after step `after` (it filters what it already holds)."""
    for step, kind, payload in kept.events():
        if step <= after:
            continue
        if kind == "metrics":
            sink.log_metrics(payload[0], step, payload[1])
        else:
            sink.log_table(payload[0], payload[1], step)


# ----- W&B offline files ----------------------------------------------------------------------------
_BLOCK, _HEADER = 32768, 7  # W&B's transaction log: LevelDB log framing (32 KiB blocks, 7-byte headers)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def offline_history(save_dir: Path, run_id: str) -> list[dict[str, Any]]:
    """The history rows ({key: value}, with `_step`) of every local session of W&B run `run_id`,
    session by session; a tail cut short by a kill is left out (W&B had not written it)."""
    # W&B names a session's directory offline-run-DATE_TIME-ID, with -N added when that name is taken
    session = re.compile(rf"offline-run-(\d{{8}}_\d{{6}})-{re.escape(run_id)}(?:-(\d+))?")
    sessions = []
    for path in (Path(save_dir) / "wandb").glob(f"offline-run-*/run-{run_id}.wandb"):
        if match := session.fullmatch(path.parent.name):
            sessions.append(((match[1], int(match[2] or 0)), path))
    return [_history_row(r) for _, path in sorted(sessions) for r in _records(path) if r.HasField("history")]


def _history_row(record) -> dict[str, Any]:
    return {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}


def _records(path: Path) -> Iterator[Any]:
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    if not data.startswith(b":W&B"):
        return
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # a block's tail too short for a header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if len(chunk) < length:
            return  # cut short
        if kind in (_FULL, _FIRST):
            pending = b""
        pending += chunk
        if kind in (_FULL, _LAST):
            try:
                yield wandb_internal_pb2.Record.FromString(pending)
            except DecodeError:
                return


# ----- helpers ----------------------------------------------------------------------------------------
def columns(rows: list[dict[str, Any]]) -> dict[str, list]:
    """Rows as {"columns", "data"}: a W&B table's arguments, and pandas' "split" JSON that MLflow tables use."""
    names = list(rows[0])
    return {"columns": names, "data": [[r.get(c) for c in names] for r in rows]}


def _kwargs(node: DictConfig) -> dict[str, Any]:
    """The keys the user set (null = the tracker's default)."""
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if v is not None}


def _stored(run_dir: Path) -> dict[str, Any]:
    path = run_dir / TRACKERS_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except ValueError:
        log.warning("%s is unreadable: the trackers start new runs", path)
        return {}


def _store(run_dir: Path, tracker: str, ids: dict[str, str]) -> None:
    stored = _stored(run_dir)
    stored[tracker] = ids
    atomic_write_text(run_dir / TRACKERS_FILE, json.dumps(stored, indent=1) + "\n")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out
