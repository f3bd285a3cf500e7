"""The Python API: SPIN on a model, tokenizer and data already in memory (a notebook, a script).

    import spinlm
    model = spinlm.spin(model, tokenizer, train_conversations, validation_conversations,
                        run_dir="runs/notebook", config={"trainer.spin.max_iterations": 2},
                        model__optim__lr=2e-5)

It is `spinlm train` without the command line: the same gpt_spin.yaml keys and checks (the
overrides are set onto the packaged config, then validated like command-line ones), the same run
directory, checkpoints, report and resume (call it again with the same `run_dir`), through the
same recipe (`spinlm.train.run`), with the objects in memory used in place of the paths.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from spinlm.errors import ConfigError

log = logging.getLogger(__name__)

_DATA_KEYS = ("train_ds", "validation_ds", "test_ds")


def spin(
    model: Any,
    tokenizer: Any,
    train_data: Any,
    validation_data: Any = None,
    *,
    test_data: Any = None,
    run_dir: str | Path | None = None,
    config: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> Any:
    """Run SPIN from `model` and return it trained (the same object: it is trained in place).

    - `model`, `tokenizer`: a Hugging Face causal LM and its tokenizer. The model is the start
      policy and the first opponent; its weights are made float32 (as `spinlm train` loads them).
    - `train_data`, `validation_data`, `test_data`: a `datasets.Dataset` (or a `DatasetDict` with
      `model.data.*_ds.split` set), a list of conversations (records in any format spinlm reads,
      e.g. `{"messages": [...]}`, or bare lists of messages), or what `model.data.*_ds.file_path`
      takes (a file, a save_to_disk directory, a hub id). Without `validation_data`, val/loss is
      measured on the training conversations (logged); `test_data` turns on held-out evaluation.
    - `run_dir`: the run directory (`exp_manager.explicit_log_dir`): metrics, checkpoints, final/.
      Calling again with the same `run_dir` resumes from its newest checkpoint.
    - `config` and keyword arguments: gpt_spin.yaml keys and values, dotted in a mapping
      (`{"model.optim.lr": 2e-5}`, or nested `{"model": {"optim": {"lr": 2e-5}}}`) or as keyword
      arguments with `__` for the dots (`model__optim__lr=2e-5`). Unknown keys, wrong types and
      impossible values raise `spinlm.errors.ConfigError`; bad data raises `DataError` naming the row.
    """
    from spinlm.config import apply_overrides, load_config
    from spinlm.model.loading import unwrap
    from spinlm.preflight import InMemory
    from spinlm.train import run
    from spinlm.utils.distributed import destroy_distributed

    cfg = load_config()
    settings = dict(config or {})
    for name, value in overrides.items():
        _add(settings, name.replace("__", "."), value)
    if run_dir is not None:
        _add(settings, "exp_manager.explicit_log_dir", str(run_dir))
    if validation_data is None:
        log.warning("spin: no validation_data; val/loss is measured on the training conversations")
        validation_data = train_data
    data = {"train_ds": train_data, "validation_ds": validation_data, "test_ds": test_data}
    in_memory = {key: value for key, value in data.items() if value is not None and not _is_path(value)}
    for key, value in data.items():
        if value is not None:
            _add(settings, f"model.data.{key}.file_path", _describe(value, key) if key in in_memory else str(value))
    _add(settings, "pretrained_checkpoint.restore_from_path", _model_path(model))
    apply_overrides(cfg, settings)
    try:
        trainer = run(cfg, inputs=InMemory(model=model, tokenizer=tokenizer, data=in_memory))
    finally:
        destroy_distributed()
    return unwrap(trainer.policy)


def _add(settings: dict[str, Any], key: str, value: Any) -> None:
    if key in settings:
        raise ConfigError(f"config: key '{key}' is given twice")
    settings[key] = value


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, Path))


def _describe(value: Any, key: str) -> str:
    """What the run's config.yaml records for data that has no path."""
    size = f", {len(value)} rows" if hasattr(value, "__len__") and not hasattr(value, "keys") else ""
    return f"<in-memory {type(value).__name__}{size}, model.data.{key}>"


def _model_path(model: Any) -> str:
    """The model's own directory when it was loaded from one (so `spinlm evaluate` can find the base
    model of a checkpoint), else a description of the in-memory model."""
    name = str(getattr(model, "name_or_path", "") or "")
    return name if name and Path(name).is_dir() else f"<in-memory {type(model).__name__}>"
