"""How long a run is and how its learning rate moves: pure functions of the config and the data size.

A run has `max_steps` optimizer steps (`count_steps`, NeMo's counting). The lr schedule
(`model.optim.sched`) is resolved against that length before any weights load
(`LRSchedule.from_config`), so a schedule that cannot do what its keys say is a config error,
not a silent change: one whose warmup never reaches `model.optim.lr`, or whose `constant_steps`
would hold `min_lr` for the whole run (NeMo's default of 1000 did that to every short run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from spinlm.config import resolve_limit
from spinlm.errors import ConfigError

SCHED_KEY = "model.optim.sched"


@dataclass(frozen=True)
class StepSchedule:
    """Step arithmetic of a run: iteration t has min(t+1, mix_iterations) pair sets per epoch
    (`model.spin.mix_iterations`, the paper's data mixing; 1 = every iteration alike)."""

    steps_per_epoch: int     # of one pair set: the iteration's own prompts
    max_epochs: int
    max_iterations: int
    mix_iterations: int = 1
    step_cap: int | None = None  # trainer.spin.max_steps (None or < 0: none)

    def epoch_steps(self, iteration: int) -> int:
        return min(iteration + 1, self.mix_iterations) * self.steps_per_epoch

    def iteration_start(self, iteration: int) -> int:
        """The step at which `iteration` starts (the number of steps before it)."""
        return sum(self.epoch_steps(j) * self.max_epochs for j in range(iteration))

    @property
    def max_steps(self) -> int:
        total = self.iteration_start(self.max_iterations)
        return min(total, self.step_cap) if self.step_cap is not None and self.step_cap >= 0 else total

    def position(self, step: int) -> tuple[int, int, int]:
        """(iteration, epoch, batch within the epoch) of the step trained after `step` steps."""
        iteration = 0
        while iteration < self.max_iterations and self.iteration_start(iteration + 1) <= step:
            iteration += 1
        offset = step - self.iteration_start(iteration)
        per_epoch = self.epoch_steps(iteration)
        return iteration, offset // per_epoch, offset % per_epoch

    def is_iteration_end(self, step: int) -> bool:
        return step > 0 and self.position(step)[1:] == (0, 0)


def step_schedule(num_train_samples: int, spin_cfg: DictConfig, global_batch_size: int,
                  mix_iterations: int = 1) -> StepSchedule:
    """The run's steps as NeMo counts them (drop_last batches, limit_train_batches), with data mixing."""
    full_epoch = num_train_samples // global_batch_size
    if full_epoch == 0:
        raise ConfigError(
            f"config: the training set has {num_train_samples} samples, fewer than "
            f"model.global_batch_size={global_batch_size}; lower the batch size or add data"
        )
    steps_per_epoch = resolve_limit(spin_cfg.limit_train_batches, full_epoch, "trainer.spin.limit_train_batches")
    if steps_per_epoch == 0:
        raise ConfigError("config: trainer.spin.limit_train_batches leaves no training batch")
    return StepSchedule(steps_per_epoch, spin_cfg.max_epochs, spin_cfg.max_iterations, mix_iterations,
                        spin_cfg.max_steps)


def count_steps(num_train_samples: int, spin_cfg: DictConfig, global_batch_size: int,
                mix_iterations: int = 1) -> tuple[int, int, int]:
    """(steps_per_epoch of one pair set, steps of the first iteration, max_steps of the run)."""
    s = step_schedule(num_train_samples, spin_cfg, global_batch_size, mix_iterations)
    return s.steps_per_epoch, s.epoch_steps(0) * s.max_epochs, s.max_steps


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


def constant_with_warmup(step: int, warmup_steps: int) -> float:
    """`Constant`: the same linear warmup as CosineAnnealing, then the peak lr to the end."""
    return (step + 1) / (warmup_steps + 1) if step < warmup_steps else 1.0


@dataclass(frozen=True)
class LRSchedule:
    """A schedule resolved against the run's length: what `build_scheduler` follows and the log shows."""

    name: str
    lr: float
    max_steps: int
    warmup_steps: int
    warmup_source: str  # which key set the warmup, for the summary line
    constant_steps: int = 0
    min_lr: float = 0.0

    @classmethod
    def from_config(cls, optim: DictConfig, max_steps: int) -> LRSchedule:
        """Resolve `model.optim.sched` for a run of `max_steps`; ConfigError (naming keys and the fix)
        when the schedule would never reach `model.optim.lr` or would sit at min_lr throughout."""
        s = optim.sched
        if s.warmup_steps is not None:
            if s.warmup_steps < 0:
                raise ConfigError(f"config: {SCHED_KEY}.warmup_steps must be >= 0 or null, got {s.warmup_steps}")
            warmup, source = int(s.warmup_steps), "warmup_steps"
        else:
            if not 0.0 <= s.warmup_ratio < 1.0:
                raise ConfigError(f"config: {SCHED_KEY}.warmup_ratio must be in [0, 1), got {s.warmup_ratio}")
            warmup, source = int(s.warmup_ratio * max_steps), f"warmup_ratio {s.warmup_ratio:g}"
        if warmup > 0 and warmup >= max_steps:
            raise ConfigError(
                f"config: {SCHED_KEY}.warmup_steps ({warmup}) is not below the run's {max_steps} optimizer steps, so "
                f"the lr would never reach model.optim.lr ({optim.lr:g}); lower {SCHED_KEY}.warmup_steps, or set it to "
                f"null to warm up over {SCHED_KEY}.warmup_ratio of the run"
            )
        if s.name == "Constant":
            return cls(s.name, optim.lr, max_steps, warmup, source)
        if s.constant_steps < 0:
            raise ConfigError(f"config: {SCHED_KEY}.constant_steps must be >= 0, got {s.constant_steps}")
        if s.min_lr > optim.lr:
            raise ConfigError(f"config: {SCHED_KEY}.min_lr ({s.min_lr:g}) is above model.optim.lr ({optim.lr:g})")
        if s.constant_steps > 0 and warmup + s.constant_steps >= max_steps:
            raise ConfigError(
                f"config: {SCHED_KEY}.constant_steps ({s.constant_steps}) + warmup ({warmup}) leave no step to decay "
                f"over in this run of {max_steps} optimizer steps, so the lr would sit at min_lr ({s.min_lr:g}) "
                f"after warmup; lower {SCHED_KEY}.constant_steps (0 decays over the whole run)"
            )
        return cls(s.name, optim.lr, max_steps, warmup, source, int(s.constant_steps), float(s.min_lr))

    def multiplier(self, step: int) -> float:
        """The lr at `step` (0-based, before that step's update) as a fraction of the peak lr."""
        if self.name == "Constant":
            return constant_with_warmup(step, self.warmup_steps)
        return cosine_annealing(step, self.max_steps, self.warmup_steps, self.constant_steps, self.min_lr / self.lr)

    def summary(self) -> str:
        """One line for the log: peak lr, warmup, decay, the lr of the last step."""
        warmup = f"warmup {self.warmup_steps} step(s) ({self.warmup_source}) to peak lr {self.lr:g}"
        last = f"last step at lr {self.lr * self.multiplier(self.max_steps - 1):.3g}"
        if self.name == "Constant":
            return f"lr schedule: Constant over {self.max_steps} steps: {warmup}, then constant; {last}"
        decay = self.max_steps - self.warmup_steps - self.constant_steps
        return (f"lr schedule: CosineAnnealing over {self.max_steps} steps: {warmup}, cosine decay over {decay} "
                f"step(s) towards min_lr {self.min_lr:g}, {self.constant_steps} step(s) held at min_lr; {last}")


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: LRSchedule) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following `schedule` (its state is just a step count: resumable, nothing pickled)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.multiplier)
