"""SPIN losses: pure functions on per-sequence log-probabilities.

Inputs are sums over the answer tokens (not means), as in SPIN and NeMo:
    r_act = log pi(y | x)  - log ref(y | x)     ground-truth answer ("actual")
    r_gen = log pi(y'| x)  - log ref(y'| x)     reference policy's answer ("generated")
Each variant maps d = r_act - r_gen to a per-pair loss; the step minimises their mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def sigmoid_loss(d: Tensor, beta: float) -> Tensor:
    """SPIN / DPO: -log sigmoid(beta * d)."""
    return F.softplus(-beta * d)


def hinge_loss(d: Tensor, beta: float) -> Tensor:
    """SLiC-style hinge: relu(1 - beta * d)."""
    return torch.relu(1.0 - beta * d)


def ipo_loss(d: Tensor, beta: float) -> Tensor:
    """IPO: (d - 1 / (2 beta))^2, regresses the margin to a fixed target instead of pushing it to infinity."""
    return (d - 1.0 / (2.0 * beta)) ** 2


LOSSES: dict[str, Callable[[Tensor, float], Tensor]] = {
    "sigmoid": sigmoid_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
}


@dataclass
class SPINLossOutput:
    losses: Tensor             # (B,) per-pair loss
    rewards_actual: Tensor     # (B,) beta * r_act (DPO convention: rewards include beta)
    rewards_generated: Tensor  # (B,) beta * r_gen


def spin_loss(
    policy_logps_actual: Tensor,
    policy_logps_generated: Tensor,
    ref_logps_actual: Tensor,
    ref_logps_generated: Tensor,
    beta: float,
    loss_type: str = "sigmoid",
) -> SPINLossOutput:
    """Per-pair SPIN loss and rewards from summed answer log-probs of policy and reference."""
    r_act = policy_logps_actual - ref_logps_actual
    r_gen = policy_logps_generated - ref_logps_generated
    losses = LOSSES[loss_type](r_act - r_gen, beta)
    return SPINLossOutput(losses, (beta * r_act).detach(), (beta * r_gen).detach())


def reward_metrics(rewards_actual: Tensor, rewards_generated: Tensor) -> dict[str, float]:
    """NeMo's reward metrics over a global batch (acc = fraction preferring the ground truth)."""
    all_rewards = torch.cat([rewards_actual, rewards_generated]).float()
    return {
        "acc": (rewards_actual > rewards_generated).float().mean().item(),
        "rewards_actual_mean": rewards_actual.float().mean().item(),
        "rewards_generated_mean": rewards_generated.float().mean().item(),
        "rewards_all_mean": all_rewards.mean().item(),
        "rewards_all_std": all_rewards.std().item() if all_rewards.numel() > 1 else 0.0,
        "reward_margin_mean": (rewards_actual - rewards_generated).float().mean().item(),
    }
