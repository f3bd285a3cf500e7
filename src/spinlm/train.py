"""The SPIN recipe: config -> model, data, optimizer, trainer -> fit. `spinlm train` and `spinlm sft` call `run`."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from spinlm.algorithms.rollouts import RolloutStore
from spinlm.algorithms.sft import SFTTrainer
from spinlm.algorithms.spin import SPINTrainer
from spinlm.config import check_num_nodes, parse_max_time
from spinlm.errors import CheckpointError, ConfigError
from spinlm.evaluation import HeldOutEvaluator
from spinlm.model import memory, parallel
from spinlm.model.backends import make_backend, resolve_backend
from spinlm.model.bf16_adamw import BF16AdamW
from spinlm.model.build import build_models
from spinlm.model.decoding import supports_cached_decoding
from spinlm.model.kernels import cpu_vendor, resolve_cpu_linear_kernel
from spinlm.model.loading import load_model_skeleton, unwrap
from spinlm.preflight import InMemory, prepare
from spinlm.report import iteration_rows, read_metrics, write_report
from spinlm.schedule import LRSchedule, build_scheduler, count_steps
from spinlm.utils.checkpoint import Checkpointer, atomic_write_text
from spinlm.utils.distributed import all_gather_objects, broadcast_from_main, info, init_distributed
from spinlm.utils.logger import RunLogger, RunTimer
from spinlm.utils.trackers import build_trackers
from spinlm.utils.rundir import RUN_CONFIG

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(accelerator: str, local_rank: int = 0) -> torch.device:
    """This rank's device: CUDA device `local_rank` (one GPU per process, as torchrun starts them) or the CPU."""
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("config: trainer.accelerator=gpu but no CUDA device is available")
        return torch.device("cuda", local_rank)
    if accelerator == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def adamw(params: list[torch.Tensor], **kwargs) -> torch.optim.Optimizer:
    """torch's fused AdamW (one kernel over all parameters) where it supports the parameters, else
    the default. Same update up to float rounding; on CPU it halves the optimizer step time.
    bf16 parameters (trainer.precision=bf16) get `BF16AdamW`: fp32 moments and exact fp32 master weights."""
    if params and params[0].dtype == torch.bfloat16:
        return BF16AdamW(params, **kwargs)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):  # e.g. a device or tensor type without a fused kernel
        return torch.optim.AdamW(params, **kwargs)


def build_optimizer(cfg: DictConfig, policy: torch.nn.Module, max_steps: int):
    """AdamW over the trainable parameters and the lr schedule resolved for a run of `max_steps`."""
    o = cfg.model.optim
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = adamw(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    return optimizer, build_scheduler(optimizer, LRSchedule.from_config(o, max_steps))


def choose_linear_kernel(configured: str, recorded: str | None) -> tuple[str, str]:
    """(kernel, why) for this run's CPU linear layers: the checkpoint's recorded kernel when resuming
    (the same rounding as the run it continues), else `model.cpu_linear_kernel` by its fixed rule."""
    resolved = resolve_cpu_linear_kernel(configured)
    if recorded is None:
        return resolved, f"model.cpu_linear_kernel={configured}, CPU vendor {cpu_vendor() or 'unknown'}"
    if configured == "auto" and resolve_cpu_linear_kernel(recorded) == recorded:
        return recorded, "recorded in the checkpoint being resumed"
    if resolved != recorded:
        log.warning("the checkpoint was trained with the %s CPU linear kernel but this run uses %s "
                    "(model.cpu_linear_kernel=%s): results will differ from an uninterrupted run by float rounding",
                    recorded, resolved, configured)
    return resolved, f"model.cpu_linear_kernel={configured}"


def warn_unused_keys(cfg: DictConfig, policy: torch.nn.Module, backend: str) -> None:
    """One warning per key that is set but has no effect in this run (gpt_spin.yaml says when)."""
    if not info().is_main:
        return
    decoder_scores = backend == "spinlm" and supports_cached_decoding(policy)
    if cfg.model.spin.log_prob_forward_micro_batch_size != 1 and decoder_scores:
        log.warning("model.spin.log_prob_forward_micro_batch_size is unused in this run: the cached decoder scores "
                    "the reference log-probs of both answers in its decoding pass")
    if cfg.exp_manager.exp_dir is not None:
        log.warning("exp_manager.exp_dir is unused: exp_manager.explicit_log_dir (%s) is the run directory",
                    cfg.exp_manager.explicit_log_dir)


def build_trainer(cfg: DictConfig, sft: bool = False, inputs: InMemory | None = None) -> SPINTrainer:
    """Everything `fit` needs, resumed from the run directory's latest checkpoint when asked.

    `sft`: plain supervised fine-tuning (`SFTTrainer`: no reference policy) instead of SPIN.
    `inputs`: a model, tokenizer and data already in memory (`spinlm.api.spin`) instead of the paths
    the config names; the model is trained in place."""
    inputs = inputs or InMemory()
    launch = init_distributed(cfg.trainer.accelerator)  # torchrun's process group; world size 1 without it
    device = pick_device(cfg.trainer.accelerator, launch.local_rank)
    # config, paths and data checked before the weights load
    prep = prepare(cfg, launch.world_size, inputs, turn_masks=sft and cfg.model.sft.loss_turns == "all")
    check_num_nodes(cfg, launch.num_nodes)
    backend = resolve_backend(cfg.model.spin.generation_backend, device)  # a missing engine fails before loading
    strategy = parallel.resolve_strategy(cfg.trainer.strategy, launch.world_size)
    # the held-out data is read before anything is written: a bad record leaves no run directory
    evaluator = HeldOutEvaluator.from_config(cfg, prep.tokenizer, prep.renderer, inputs.data.get("test_ds"))
    run_dir = Path(cfg.exp_manager.explicit_log_dir)
    ckpt = cfg.exp_manager.checkpoint_callback_params
    checkpointer = Checkpointer(run_dir / "checkpoints", keep_last=ckpt.save_top_k, monitor=ckpt.monitor, mode=ckpt.mode)
    resume = read_resume(cfg, checkpointer)  # before anything is written: a refused checkpoint changes nothing
    # trackers (W&B, MLflow) connect before the weights load: a login problem shows in seconds
    trackers = build_trackers(cfg, run_dir, resuming=resume is not None) if launch.is_main else []
    logger = RunLogger(run_dir, tensorboard=cfg.exp_manager.create_tensorboard_logger, active=launch.is_main,
                       sinks=trackers)
    # rank 0 decides the kernel (it changes float rounding) and every rank uses its choice
    recorded = resume[1][1].get("cpu_linear_kernel") if resume is not None else None
    kernel, why = broadcast_from_main(
        choose_linear_kernel(cfg.model.cpu_linear_kernel, recorded) if launch.is_main else None)
    _, _, max_steps = count_steps(len(prep.train), cfg.trainer.spin, cfg.model.global_batch_size,
                                  cfg.model.spin.mix_iterations)
    if launch.is_main:
        log.info("run %r in %s; CPU linear layers: %s (%s)", cfg.exp_manager.name, run_dir, kernel, why)
        log.info(LRSchedule.from_config(cfg.model.optim, max_steps).summary())
    # one line; on CUDA a run that cannot fit stops here, before any weight loads
    memory.report(cfg, prep.train.samples, strategy, launch.world_size, device,
                  inputs.model.config if inputs.model is not None else None)

    seed_everything(cfg.model.seed)
    # rank 0 reads the weights (or every rank holds them: a model in memory)
    policy, reference = build_models(cfg, prep.tokenizer, strategy, device, kernel, inputs.model,
                                     with_reference=not sft)
    vocab_size = unwrap(policy).get_input_embeddings().num_embeddings  # bounds the token ids of stored rollouts
    warn_unused_keys(cfg, unwrap(policy), backend)
    # an engine takes its architecture from the model as loaded (on the meta device: no weights, no adapters)
    architecture = inputs.model if inputs.model is not None else load_model_skeleton(
        cfg.pretrained_checkpoint.restore_from_path, prep.tokenizer,
        trust_remote_code=cfg.pretrained_checkpoint.trust_remote_code)
    generator = make_backend(cfg, prep.tokenizer, architecture, device)
    if launch.rank > 0:
        torch.manual_seed(cfg.model.seed + 1_000_003 * launch.rank)  # own dropout stream; rank 0 as 1 process
    if launch.is_distributed:
        log.info("%d processes on %d node(s), strategy %s, backend %s", launch.world_size, launch.num_nodes,
                 strategy, torch.distributed.get_backend())

    if launch.is_main:  # the config as run: the kernel resolved (the checkpoints record it too)
        as_run = cfg.copy()
        as_run.model.cpu_linear_kernel = kernel
        atomic_write_text(run_dir / RUN_CONFIG, OmegaConf.to_yaml(as_run))
    optimizer, scheduler = build_optimizer(cfg, policy, max_steps=max_steps)
    trainer = (SFTTrainer if sft else SPINTrainer)(
        cfg, policy, reference, prep.tokenizer, optimizer, scheduler, prep.train, prep.val,
        logger=logger, checkpointer=checkpointer, rollout_store=RolloutStore(run_dir / "rollouts", vocab_size),
        run_timer=RunTimer(parse_max_time(cfg.exp_manager.max_time_per_run, "exp_manager.max_time_per_run")),
        generator=generator, end_strings=prep.renderer.end_strings, evaluator=evaluator,
        grad_scaler=torch.amp.GradScaler(device.type, enabled=str(cfg.trainer.precision) == "16-mixed"),
    )

    if resume is not None:
        trainer.restore(*resume)
    else:
        logger.rewind(-1)  # rows of an earlier attempt that died before its first checkpoint
    return trainer


def read_resume(cfg: DictConfig, checkpointer: Checkpointer) -> tuple[Path, tuple[dict, dict]] | None:
    """(path, (states, meta)) of the checkpoint to resume, or None. Rank 0 finds and verifies it;
    every rank reads it, but for the optimizer state (twice the weights' size), which rank 0 alone
    reads and shares out (`SPINTrainer.restore`). A refusal raises on every rank, so none waits for
    the others."""
    if not cfg.exp_manager.resume_if_exists:
        return None
    found: Path | CheckpointError | None = None
    if info().is_main:
        try:
            found = checkpointer.latest()
        except CheckpointError as e:
            found = e
    found = broadcast_from_main(found)
    if isinstance(found, CheckpointError):
        raise found
    if found is None:
        if not cfg.exp_manager.resume_ignore_no_checkpoint:
            raise ConfigError(f"config: exp_manager.resume_if_exists: no checkpoint in {checkpointer.directory}")
        return None
    try:
        loaded: tuple[dict, dict] | CheckpointError = checkpointer.load(
            found, {}, skip=() if info().is_main else ("optimizer",))
    except CheckpointError as e:
        loaded = e
    refusals = [e for e in all_gather_objects(loaded if isinstance(loaded, CheckpointError) else None) if e]
    if refusals:
        raise refusals[0]
    return found, loaded


def run(cfg: DictConfig, sft: bool = False, inputs: InMemory | None = None) -> SPINTrainer:
    trainer = build_trainer(cfg, sft, inputs)
    try:
        trainer.fit()
        if info().is_main:
            run_dir = trainer.logger.run_dir
            table = write_report(run_dir)
            trainer.logger.log_report(iteration_rows(read_metrics(run_dir)),
                                      [run_dir / "report.md", run_dir / "report.png"])
            log.info("report: %s", run_dir / "report.md")
            print(table)
    finally:
        trainer.logger.close()
        trainer.generator.close()
    return trainer
