"""The SPIN recipe: config -> model, data, optimizer, trainer -> fit. `spinlm train` calls `run`."""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from spinlm.algorithms.rollouts import RolloutStore
from spinlm.algorithms.spin import SPINTrainer, count_steps
from spinlm.config import check_num_nodes, parse_max_time
from spinlm.errors import CheckpointError, ConfigError
from spinlm.evaluation import HeldOutEvaluator
from spinlm.model import parallel
from spinlm.model.loading import load_model
from spinlm.model.reference import ReferencePolicy
from spinlm.preflight import prepare
from spinlm.report import iteration_rows, read_metrics, write_report
from spinlm.utils.checkpoint import Checkpointer, atomic_write_text
from spinlm.utils.distributed import broadcast_from_main, info, init_distributed
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


def cosine_annealing(step: int, max_steps: int, warmup_steps: int, constant_steps: int, min_ratio: float) -> float:
    """NeMo's CosineAnnealing as a multiplier of the peak lr: linear warmup (step+1)/(warmup+1) up to
    the peak at step `warmup_steps`, cosine decay to min_lr, then min_lr for the final `constant_steps`."""
    if warmup_steps > 0 and step <= warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(max_steps - warmup_steps - constant_steps, 0)
    if decay_steps == 0 or step >= warmup_steps + decay_steps:
        return min_ratio
    progress = (step - warmup_steps) / decay_steps
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adamw(params: list[torch.Tensor], **kwargs) -> torch.optim.AdamW:
    """torch's fused AdamW (one kernel over all parameters) where it supports the parameters, else
    the default. Same update up to float rounding; on CPU it halves the optimizer step time."""
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):  # e.g. a device or tensor type without a fused kernel
        return torch.optim.AdamW(params, **kwargs)


def build_optimizer(cfg: DictConfig, policy: torch.nn.Module, max_steps: int):
    o = cfg.model.optim
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = adamw(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if o.sched.name == "Constant":
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    else:
        s = o.sched
        min_ratio = s.min_lr / o.lr
        if max_steps - s.warmup_steps - s.constant_steps <= 0:
            log.warning(
                "model.optim.sched: warmup_steps (%d) + constant_steps (%d) leave no step to decay over in a "
                "run of %d steps, so the lr drops to min_lr (%g) after warmup; lower constant_steps",
                s.warmup_steps, s.constant_steps, max_steps, s.min_lr,
            )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: cosine_annealing(step, max_steps, s.warmup_steps, s.constant_steps, min_ratio)
        )
    return optimizer, scheduler


def build_trainer(cfg: DictConfig) -> SPINTrainer:
    """Everything `fit` needs, resumed from the run directory's latest checkpoint when asked."""
    launch = init_distributed(cfg.trainer.accelerator)  # torchrun's process group; world size 1 without it
    device = pick_device(cfg.trainer.accelerator, launch.local_rank)
    prep = prepare(cfg, launch.world_size)  # config, paths and data checked before the weights load
    check_num_nodes(cfg, launch.num_nodes)
    strategy = parallel.resolve_strategy(cfg.trainer.strategy, launch.world_size)
    run_dir = Path(cfg.exp_manager.explicit_log_dir)
    ckpt = cfg.exp_manager.checkpoint_callback_params
    checkpointer = Checkpointer(run_dir / "checkpoints", keep_last=ckpt.save_top_k, monitor=ckpt.monitor, mode=ckpt.mode)
    resume = read_resume(cfg, checkpointer)  # before anything is written: a refused checkpoint changes nothing
    # trackers (W&B, MLflow) connect before the weights load: a login problem shows in seconds
    trackers = build_trackers(cfg, run_dir, resuming=resume is not None) if launch.is_main else []
    logger = RunLogger(run_dir, tensorboard=cfg.exp_manager.create_tensorboard_logger, active=launch.is_main,
                       sinks=trackers)
    evaluator = HeldOutEvaluator.from_config(cfg, prep.tokenizer, prep.renderer)
    seed_everything(cfg.model.seed)
    policy = load_model(cfg.pretrained_checkpoint.restore_from_path, prep.tokenizer,
                        cpu_linear_kernel=cfg.model.cpu_linear_kernel,
                        trust_remote_code=cfg.pretrained_checkpoint.trust_remote_code)
    vocab_size = policy.get_input_embeddings().num_embeddings  # bounds the token ids of stored rollouts
    reference = ReferencePolicy(policy)  # copied on the CPU, then placed (sharded) like the policy
    policy = parallel.wrap_policy(policy, strategy, device)
    reference.module = parallel.place_reference(reference.module, strategy, device)
    if launch.rank > 0:
        torch.manual_seed(cfg.model.seed + 1_000_003 * launch.rank)  # own dropout stream; rank 0 as 1 process
    if launch.is_distributed:
        log.info("%d processes on %d node(s), strategy %s, backend %s", launch.world_size, launch.num_nodes,
                 strategy, torch.distributed.get_backend())

    if launch.is_main:
        atomic_write_text(run_dir / RUN_CONFIG, OmegaConf.to_yaml(cfg))
    _, _, max_steps = count_steps(len(prep.train), cfg.trainer.spin, cfg.model.global_batch_size)
    optimizer, scheduler = build_optimizer(cfg, policy, max_steps=max_steps)
    trainer = SPINTrainer(
        cfg, policy, reference, prep.tokenizer, optimizer, scheduler, prep.train, prep.val,
        logger=logger, checkpointer=checkpointer, rollout_store=RolloutStore(run_dir / "rollouts", vocab_size),
        run_timer=RunTimer(parse_max_time(cfg.exp_manager.max_time_per_run, "exp_manager.max_time_per_run")),
        end_strings=prep.renderer.end_strings, evaluator=evaluator,
    )

    if resume is not None:
        trainer.restore(*resume)
    else:
        logger.rewind(-1)  # rows of an earlier attempt that died before its first checkpoint
    return trainer


def read_resume(cfg: DictConfig, checkpointer: Checkpointer) -> tuple[Path, tuple[dict, dict]] | None:
    """(path, (states, meta)) of the checkpoint to resume, or None. Rank 0 finds and verifies it;
    every rank reads it (a refusal raises on every rank, so none waits for the others)."""
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
    return found, checkpointer.load(found, {})


def run(cfg: DictConfig) -> SPINTrainer:
    trainer = build_trainer(cfg)
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
    return trainer
