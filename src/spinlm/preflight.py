"""Every check that can run before the weights load: a bad run fails in seconds, not after an hour.

`prepare(cfg)` checks, in order:
  1. the config (`config.validate`: impossible values, types, batch sizes, KL schedule, max_time);
  2. the paths it names (data files, the model) and the run directory (an existing checkpoint with
     `exp_manager.resume_if_exists=false` is an error, not an overwrite; no link may lead out of it);
  3. the data: every record is read, rendered with the model's tokenizer and held against the
     length limits (from the model's config, read without its weights);
  4. the step counts (enough samples for one global batch, valid intervals) and the lr schedule
     resolved against them (`schedule.LRSchedule`).
It writes nothing; a problem raises `ConfigError` / `DataError` naming the key or `file:line`, which
the CLI prints as one line (exit code 2).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from spinlm.config import resolve_interval, validate
from spinlm.data.dataset import SPINDataset, build_dataset, subsample
from spinlm.data.render import ChatRenderer
from spinlm.errors import ConfigError, DataError
from spinlm.model.loading import context_length, load_model_config, load_tokenizer
from spinlm.schedule import LRSchedule, count_steps
from spinlm.utils.checkpoint import Checkpointer
from spinlm.utils.rundir import refuse_links_out

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """What the checks produced and training reuses: the tokenizer, renderer and both datasets."""

    tokenizer: Any
    renderer: ChatRenderer
    train: SPINDataset
    val: SPINDataset


def prepare(cfg: DictConfig, world_size: int = 1, turn_masks: bool = False) -> Prepared:
    """Check the config, paths, run directory and data; resolve the config's computed values in place.

    `turn_masks`: the training samples also mark their prompts' earlier answers (SFT on every turn)."""
    validate(cfg, world_size)
    check_paths(cfg)
    check_run_dir(cfg)
    model_path, trust = cfg.pretrained_checkpoint.restore_from_path, cfg.pretrained_checkpoint.trust_remote_code
    tokenizer = load_tokenizer(model_path, trust)
    context = context_length(load_model_config(model_path, trust))
    if cfg.model.encoder_seq_length is None:
        cfg.model.encoder_seq_length = context
    OmegaConf.resolve(cfg)

    renderer = ChatRenderer(tokenizer, cfg.model.data.chat_prompt_tokens)
    datasets = {key: _dataset(cfg, key, renderer, context, turn_masks and key == "train_ds")
                for key in ("train_ds", "validation_ds")}
    train = datasets["train_ds"]
    if cfg.model.data.sample:
        if cfg.trainer.spin.max_steps is None or cfg.trainer.spin.max_steps <= 0:
            raise ConfigError("config: model.data.sample=true needs trainer.spin.max_steps > 0")
        train = subsample(train, cfg.trainer.spin.max_steps * cfg.model.global_batch_size, cfg.model.seed)
    steps_per_epoch, _, max_steps = count_steps(len(train), cfg.trainer.spin, cfg.model.global_batch_size,
                                                cfg.model.spin.mix_iterations)
    resolve_interval(cfg.trainer.spin.val_check_interval, steps_per_epoch, "trainer.spin.val_check_interval")
    LRSchedule.from_config(cfg.model.optim, max_steps)  # a schedule that cannot do what its keys say
    return Prepared(tokenizer, renderer, train, datasets["validation_ds"])


def check_paths(cfg: DictConfig) -> None:
    """The data files and the model exist (a typo fails here, not after the model has loaded)."""
    for key in ("train_ds", "validation_ds"):
        path = Path(cfg.model.data[key].file_path)
        if path.is_dir():
            raise DataError(f"{path}:0: is a directory, expected a JSONL file (model.data.{key}.file_path)")
        if not path.is_file():
            raise DataError(f"{path}:0: file not found (model.data.{key}.file_path)")
    model = Path(cfg.pretrained_checkpoint.restore_from_path)
    if not model.exists():
        raise ConfigError(f"config: pretrained_checkpoint.restore_from_path: {model} does not exist")


def check_run_dir(cfg: DictConfig) -> None:
    """The run directory can be used: not a file, no link leading out of it (`rundir.refuse_links_out`);
    existing checkpoints only when resuming."""
    run_dir = Path(cfg.exp_manager.explicit_log_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"config: exp_manager.explicit_log_dir: {run_dir} is a file, expected a directory")
    refuse_links_out(run_dir)
    existing = Checkpointer(run_dir / "checkpoints").step_dirs()
    if existing and not cfg.exp_manager.resume_if_exists:
        raise ConfigError(
            f"config: exp_manager.resume_if_exists=false but {run_dir / 'checkpoints'} holds {len(existing)} "
            f"checkpoint(s) (newest {existing[-1].name}); set resume_if_exists=true to resume, or use a new "
            "exp_manager.explicit_log_dir"
        )
    if not existing and cfg.exp_manager.resume_if_exists and not cfg.exp_manager.resume_ignore_no_checkpoint:
        raise ConfigError(
            f"config: exp_manager.resume_if_exists: no checkpoint in {run_dir / 'checkpoints'} "
            "(resume_ignore_no_checkpoint=false)"
        )


def _dataset(cfg: DictConfig, key: str, renderer: ChatRenderer, context: int, turn_masks: bool) -> SPINDataset:
    ds_cfg = cfg.model.data[key]
    max_new = cfg.model.spin.length_params.max_length
    if ds_cfg.max_seq_length > context:
        raise ConfigError(
            f"config: model.data.{key}.max_seq_length ({ds_cfg.max_seq_length}) exceeds the model's context length "
            f"({context}); lower model.encoder_seq_length"
        )
    if max_new >= ds_cfg.max_seq_length:
        raise ConfigError(
            f"config: model.spin.length_params.max_length ({max_new}) must be below "
            f"model.data.{key}.max_seq_length ({ds_cfg.max_seq_length}) to leave room for the prompt"
        )
    return build_dataset(
        ds_cfg.file_path, renderer, ds_cfg.max_seq_length, ds_cfg.max_seq_length - max_new,
        policy=cfg.model.data.length_policy, skip_bad=bool(cfg.model.data.skip_bad_records), turn_masks=turn_masks,
    )
