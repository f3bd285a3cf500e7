"""Guards around a training step: out-of-memory turned into numbers and config keys, non-finite
losses and gradients caught before the optimizer (and so before any save) sees them."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from spinlm.errors import TrainingError

log = logging.getLogger(__name__)


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "not enough memory" in text)


@contextlib.contextmanager
def oom_guard(phase: str, numbers: dict[str, int], keys: tuple[str, ...]) -> Iterator[None]:
    """Re-raise an out-of-memory error as one TrainingError line: the phase, its sizes, what to lower."""
    try:
        yield
    except (RuntimeError, MemoryError) as err:
        if not _is_oom(err):
            raise
        sizes = ", ".join(f"{k} {v}" for k, v in numbers.items())
        raise TrainingError(
            f"out of memory during {phase} ({sizes}); lower {', '.join(keys)}"
        ) from err


def first_non_finite_grad(module: nn.Module) -> str | None:
    """Name of the first parameter whose gradient holds NaN/inf (the place a blow-up shows first);
    under FSDP2 this rank's shard of each gradient is checked."""
    for name, param in module.named_parameters():
        grad = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
        if grad is not None and not torch.isfinite(grad).all():
            return name
    return None


def clip_checked(module: nn.Module, max_norm: float | None) -> torch.Tensor:
    """Global gradient norm, measured BEFORE clipping; a non-finite norm is returned unclipped.
    FSDP2 (DTensor) gradients: the norm covers all shards; a plain tensor is returned."""
    params = [p for p in module.parameters() if p.requires_grad and p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    value = norm.full_tensor() if isinstance(norm, DTensor) else norm
    if torch.isfinite(value) and max_norm:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return value


def non_finite(step: int, what: str, skip: bool) -> None:
    """Stop with a TrainingError naming the step (nothing of it is applied or saved), or, with
    trainer.spin.skip_non_finite_steps=true, log that the step's update is skipped."""
    if not skip:
        raise TrainingError(
            f"step {step}: {what}; stopped before the optimizer step, so no NaN weights were applied or saved "
            "(the last checkpoint is intact). Lower model.optim.lr or trainer.spin.gradient_clip_val, or set "
            "trainer.spin.skip_non_finite_steps=true to skip such steps"
        )
    log.warning("step %d: %s; update skipped (trainer.spin.skip_non_finite_steps=true)", step, what)


def apply_gradients(module: nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler,
                    max_norm: float | None, step: int, skip: bool) -> tuple[float, float] | str:
    """Unscale, clip, check and apply the accumulated gradients of step `step`: (grad norm, lr), or
    why the update is skipped ("skipped_overflow": an fp16 overflow lowers the scale;
    "skipped_non_finite": a non-finite norm under `skip`, else TrainingError)."""
    scaler.unscale_(optimizer)
    grad_norm = clip_checked(module, max_norm)
    if not torch.isfinite(grad_norm) and scaler.is_enabled():  # fp16 overflow: lower the scale, skip
        scaler.step(optimizer)  # skips the update (the scaler saw the inf)
        scaler.update()
        return "skipped_overflow"
    if not torch.isfinite(grad_norm):
        where = first_non_finite_grad(module)
        non_finite(step, f"the gradient norm is {grad_norm.item()} (first non-finite: {where})", skip)
        return "skipped_non_finite"
    lr = optimizer.param_groups[0]["lr"]
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)  # no gradients held through generation and validation
    return grad_norm.item(), lr
