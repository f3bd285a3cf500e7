"""Every check that can run before the weights load: a bad run fails in seconds, not after an hour.

`prepare(cfg)` checks, in order:
  1. the config (`config.validate`: impossible values, types, batch sizes, KL schedule, max_time,
     LoRA settings); LoRA's target modules against the model's config (`lora.check_targets`);
  2. the paths it names (data files, the model) and the run directory (an existing checkpoint with
     `exp_manager.resume_if_exists=false` is an error, not an overwrite; no link may lead out of it);
  3. the data: every record is read, rendered with the model's tokenizer and held against the
     length limits (from the model's config, read without its weights);
  4. the step counts (enough samples for one global batch, valid intervals) and the lr schedule
     resolved against them (`schedule.LRSchedule`).
It writes nothing to the run directory (only the token cache, see `spinlm.data.tokenize`); a problem
raises `ConfigError` / `DataError` naming the key, `file:line` or row and column, which the CLI prints
as one line (exit code 2).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from spinlm.config import cache_dir, resolve_interval, validate
from spinlm.data.dataset import SPINDataset, Tokenizing, build_dataset, subsample
from spinlm.data.render import ChatRenderer
from spinlm.data.sources import DataSource, check_source
from spinlm.errors import ConfigError
from spinlm.model.loading import context_length, load_model_config, load_tokenizer, unwrap
from spinlm.model.lora import LoraSettings, check_targets
from spinlm.schedule import LRSchedule, count_steps
from spinlm.utils.checkpoint import Checkpointer
from spinlm.utils.distributed import info
from spinlm.utils.rundir import refuse_links_out

log = logging.getLogger(__name__)


@dataclass
class InMemory:
    """Objects the Python API hands over instead of paths: a model, its tokenizer, and data per
    `model.data` section (train_ds / validation_ds / test_ds: a datasets.Dataset or a list)."""

    model: Any = None
    tokenizer: Any = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Prepared:
    """What the checks produced and training reuses: the tokenizer, renderer and both datasets."""

    tokenizer: Any
    renderer: ChatRenderer
    train: SPINDataset
    val: SPINDataset


def prepare(cfg: DictConfig, world_size: int = 1, inputs: InMemory | None = None,
            turn_masks: bool = False) -> Prepared:
    """Check the config, paths, run directory and data; resolve the config's computed values in place.

    `inputs`: a model, tokenizer and data held in memory (the Python API), used instead of what
    pretrained_checkpoint.restore_from_path and model.data.*.file_path name.
    `turn_masks`: the training samples also mark their prompts' earlier answers (SFT on every turn)."""
    inputs = inputs or InMemory()
    validate(cfg, world_size)
    check_paths(cfg, inputs)
    check_run_dir(cfg)
    model_path, trust = cfg.pretrained_checkpoint.restore_from_path, cfg.pretrained_checkpoint.trust_remote_code
    tokenizer = inputs.tokenizer if inputs.tokenizer is not None else load_tokenizer(model_path, trust)
    model_config = load_model_config(model_path, trust) if inputs.model is None else unwrap(inputs.model).config
    context = context_length(model_config)
    lora_settings = LoraSettings.from_config(cfg.model)
    if lora_settings is not None:
        check_targets(model_config, lora_settings, trust)  # on the meta device: no weights read
    if cfg.model.encoder_seq_length is None:
        cfg.model.encoder_seq_length = context
    OmegaConf.resolve(cfg)

    renderer = ChatRenderer(tokenizer, cfg.model.data.chat_prompt_tokens)
    datasets = {key: _dataset(cfg, key, renderer, context, inputs, turn_masks and key == "train_ds")
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


def check_paths(cfg: DictConfig, inputs: InMemory | None = None) -> None:
    """The data sources and the model exist (a typo fails here, not after the model has loaded)."""
    inputs = inputs or InMemory()
    for key in ("train_ds", "validation_ds", "test_ds"):
        if cfg.model.data[key].file_path is not None or key in inputs.data:
            check_source(data_source(cfg, key, inputs))
    if inputs.model is not None:
        return
    model = Path(cfg.pretrained_checkpoint.restore_from_path)
    if not model.exists():
        raise ConfigError(f"config: pretrained_checkpoint.restore_from_path: {model} does not exist")


def token_cache_dir() -> Path:
    """Where tokenized data is cached: $SPINLM_CACHE/tokens (see spinlm.data.tokenize)."""
    return cache_dir() / "tokens"


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


def data_source(cfg: DictConfig, key: str, inputs: InMemory | None = None) -> DataSource:
    """The source of `model.data.<key>`: its file_path, or the in-memory data given for it."""
    return DataSource.from_config(cfg.model.data[key], f"model.data.{key}", (inputs.data if inputs else {}).get(key))


def _dataset(cfg: DictConfig, key: str, renderer: ChatRenderer, context: int, inputs: InMemory,
             turn_masks: bool) -> SPINDataset:
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
    tokenizing = Tokenizing(
        workers=cfg.model.data.tokenizer_workers,
        cache_dir=token_cache_dir() if cfg.model.data.token_cache else None,
        with_generated=key == "train_ds" and bool(cfg.model.spin.first_opponent_from_data),
        show_progress=info().is_main, processes_per_node=info().local_world_size,
    )
    return build_dataset(
        data_source(cfg, key, inputs), renderer, ds_cfg.max_seq_length, ds_cfg.max_seq_length - max_new,
        policy=cfg.model.data.length_policy, skip_bad=bool(cfg.model.data.skip_bad_records), turn_masks=turn_masks,
        tokenizing=tokenizing,
    )
