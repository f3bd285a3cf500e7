"""The frozen opponent of SPIN: the previous iterate, which generates and scores reference log-probs."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from spinlm.model.loading import unwrap
from spinlm.model.logprobs import masked_sum_logprobs


class ReferencePolicy:
    """The frozen opponent (previous iterate): a separate copy of the policy's weights.

    Design: a frozen copy rather than NeMo's CPU state-dict swap. NeMo swaps the reference weights
    into the policy and back for every generation and reference pass (two full weight copies per
    step); here generation and reference log-probs never touch the policy, and a refresh at an
    iteration boundary is one in-place copy. The cost is one extra set of weights in memory
    (SmolLM2-135M: ~0.5 GB in fp32).

    The copy is made with ``copy.deepcopy`` of the unwrapped model, which preserves tied weights
    (deepcopy memoises shared tensors). Do this before anything patches the policy's forward.
    """

    def __init__(self, policy: nn.Module) -> None:
        self.module = copy.deepcopy(unwrap(policy))
        self.module.requires_grad_(False)
        self.module.eval()

    def refresh_from(self, policy: nn.Module) -> None:
        """Make the reference equal to the current policy, copying into the existing tensors."""
        self.load_state_dict(unwrap(policy).state_dict())

    def state_dict(self) -> dict[str, Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Strict load (a checkpoint from another model is an error), copied in place: no reallocation."""
        self.module.load_state_dict(state_dict, strict=True)

    def logprobs(self, input_ids: Tensor, masks: Tensor, micro_batch_size: int | None = None) -> Tensor:
        """(B,) reference log p(answer | prompt), without a graph."""
        with torch.no_grad():
            return masked_sum_logprobs(self.module, input_ids, masks, micro_batch_size=micro_batch_size)
