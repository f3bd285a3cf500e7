"""The frozen opponent of SPIN: the previous iterate, which generates and scores reference log-probs.

One interface, three kinds (`reference_kind` picks one for a run):
- `PolicyAsReference`: the policy itself, used only while it equals the reference (full fine-tuning);
- `FrozenReference`: a separate frozen copy of the policy's weights (full fine-tuning that generates
  mid-iteration, or mixed precision under FSDP2);
- `LoraReference`: the policy itself with its LoRA adapters switched off (no second copy).

Callers use only the interface: `active()` for generation and reference log-probs, `state_dict()` for
the weights under Hugging Face's names as held (an inference engine's push), `full_state_dict()` for
them gathered (comparisons), `refresh_from(policy)` at an iteration end, and `checkpoint_weights` /
`checkpoint_state` / `restore` for checkpoints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from spinlm.errors import TrainingError
from spinlm.model import lora, parallel
from spinlm.model.loading import unwrap
from spinlm.model.logprobs import masked_sum_logprobs
from spinlm.model.precision import Precision, frozen_copy, precision_of


# in a checkpoint's reference state: no reference weights saved; the policy is the reference at an iteration's start
POLICY_IS_REFERENCE = "policy_is_reference"


def reference_kind(precision: Precision, strategy: str, lora: bool, regenerate_each_epoch: bool) -> str:
    """Which reference a full or LoRA run holds: "lora", "frozen" or "policy" (see the module docstring).

    Full fine-tuning needs its opponent only at an iteration's start, when the policy still equals it
    (`PolicyAsReference`), unless it generates again at every epoch. Under FSDP2 a mixed-precision forward
    would cast the sharded fp32 weights at every decoding step: a frozen copy in the compute dtype instead."""
    if lora:
        return "lora"
    if regenerate_each_epoch or (strategy == "fsdp" and precision.autocast_dtype is not None):
        return "frozen"
    return "policy"


class ReferencePolicy:
    """What SPIN needs of its opponent (the previous iterate)."""

    def require(self, at_iteration_start: bool, what: str) -> None:
        """Raise a TrainingError saying `what` cannot be done where this reference does not exist."""

    def active(self) -> contextlib.AbstractContextManager[nn.Module]:
        """A module whose forward is the reference's (eval mode, no grad), for the duration."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Tensor]:
        """The weights under plain Hugging Face names, as this rank holds them, copying nothing: full
        tensors, or under FSDP2 DTensor shards (`full_tensor()` gathers one). What an engine push reads
        one tensor at a time (`GenerationBackend.sync_weights`), at every generation."""
        raise NotImplementedError

    def full_state_dict(self) -> dict[str, Tensor]:
        """The weights under plain Hugging Face names, full, on the CPU. Under torchrun a collective: call
        on every rank; rank 0 gets the tensors (the others may get {})."""
        raise NotImplementedError

    def refresh_from(self, policy: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """At an iteration end: the reference becomes the current policy."""
        raise NotImplementedError

    def checkpoint_weights(self) -> dict[str, dict[str, Tensor]]:
        """Weight files a checkpoint needs besides the policy's (name -> full state dict)."""
        return {}

    def checkpoint_state(self) -> dict:
        """Plain values a checkpoint needs to resume the reference exactly."""
        return {}

    def restore(self, read_weights: Callable[[str], dict[str, Tensor]], state: dict) -> None:
        """Back to a checkpoint: `read_weights(name)` gives a `checkpoint_weights` file (rank 0 reads)."""

    def logprobs(self, input_ids: Tensor, masks: Tensor, micro_batch_size: int | None = None) -> Tensor:
        """(B,) reference log p(answer | prompt), without a graph."""
        with self.active() as module:
            return masked_sum_logprobs(module, input_ids, masks, micro_batch_size=micro_batch_size)


class FrozenReference(ReferencePolicy):
    """A separate frozen copy of the weights.

    Design: a frozen copy rather than NeMo's CPU state-dict swap. NeMo swaps the reference weights
    into the policy and back for every generation and reference pass (two full weight copies per
    step); here generation and reference log-probs never touch the policy, and a refresh at an
    iteration boundary is one in-place copy. The cost is one extra set of weights in memory
    (SmolLM2-135M: ~0.5 GB in fp32; half that under bf16 or bf16-mixed, see `copy_of`), on the device (sharded under FSDP2).
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.module.requires_grad_(False)
        self.module.eval()
        self.from_policy = False  # restored from a checkpoint without a copy: right at an iteration's start only

    @classmethod
    def copy_of(cls, policy: nn.Module, precision: Precision | None = None) -> FrozenReference:
        """A copy of the unwrapped policy, on its device, each weight in the dtype `precision`'s forward computes
        with (`model/precision.py`: under autocast linear layers in bf16/fp16, a tied LM head untied; default:
        as the policy's); other tied weights stay tied. Make it before anything patches the policy's forward."""
        return cls(frozen_copy(unwrap(policy), precision or precision_of("32")))

    @contextlib.contextmanager
    def active(self) -> Iterator[nn.Module]:
        with torch.no_grad():
            yield self.module

    def state_dict(self) -> dict[str, Tensor]:
        return self.module.state_dict()

    def full_state_dict(self) -> dict[str, Tensor]:
        return parallel.full_state_dict(self.module)

    def load_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Strict (a checkpoint from another model is an error), copied in place: no reallocation."""
        parallel.load_full_state_dict(self.module, state_dict)

    def refresh_from(self, policy: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Copy the policy's weights into the existing tensors (shard by shard under FSDP2)."""
        self.module.load_state_dict(unwrap(policy).state_dict(), strict=True)
        self.from_policy = False

    def checkpoint_weights(self) -> dict[str, dict[str, Tensor]]:
        return {} if self.from_policy else {"reference": self.full_state_dict()}  # from_policy: not the reference

    def restore(self, read_weights: Callable[[str], dict[str, Tensor]], state: dict) -> None:
        """The checkpoint's copy; from a run that kept none (`PolicyAsReference`: resumed under FSDP2 with mixed
        precision, or generating every epoch), the checkpoint's policy, which is the reference at an iteration's
        start; inside an iteration it is not, and `require` refuses it until the next refresh."""
        self.from_policy = bool(state.get(POLICY_IS_REFERENCE))
        self.load_state_dict(read_weights("policy" if self.from_policy else "reference"))

    def checkpoint_state(self) -> dict:
        return {POLICY_IS_REFERENCE: True} if self.from_policy else {}

    def require(self, at_iteration_start: bool, what: str) -> None:
        if self.from_policy and not at_iteration_start:
            raise TrainingError(f"{what} needs the reference policy, and the checkpoint resumed (written without a "
                                "reference copy) holds only the policy: restore the run's rollouts/ files, or resume "
                                "from the checkpoint at the iteration's start")


class PolicyAsReference(ReferencePolicy):
    """Full fine-tuning without a second copy of the weights: the policy is the reference while they are equal.

    SPIN uses its opponent once per iteration, before the first step: generation and the reference
    log-probs are made then and kept on disk (a resume reads them), and the held-out evaluation runs
    right after an iteration end. At those moments the policy is the reference, so a frozen copy held
    through training (`FrozenReference`: 4 B/param in fp32, 2 in bf16) buys nothing and checkpoints
    need no reference file. Inside an iteration it does not exist (`require`).

    Under mixed precision the policy's weights are fp32 but the reference computes in bf16 or fp16:
    `active()` makes a frozen copy in the compute dtype for its duration (decoding must not cast the
    weights at every step) and drops it on exit, while no gradients exist (they are freed after each step).
    """

    def __init__(self, policy: nn.Module, precision: Precision) -> None:
        self.policy, self.precision = policy, precision

    def require(self, at_iteration_start: bool, what: str) -> None:
        if not at_iteration_start:
            raise TrainingError(f"{what} needs the reference policy, and full fine-tuning keeps no copy of it "
                                "(model/reference.py): restore the run's rollouts/ files, or resume from the "
                                "checkpoint at the iteration's start")

    @contextlib.contextmanager
    def active(self) -> Iterator[nn.Module]:
        module = unwrap(self.policy)  # without DDP: no gradient sync
        if self.precision.autocast_dtype is not None and not parallel.is_sharded(module):
            with torch.no_grad():
                yield frozen_copy(module, self.precision)
            return
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                yield module
        finally:
            module.train(was_training)

    def state_dict(self) -> dict[str, Tensor]:
        return unwrap(self.policy).state_dict()

    def full_state_dict(self) -> dict[str, Tensor]:
        return parallel.full_state_dict(self.policy)

    def refresh_from(self, policy: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Nothing to copy: the policy is the new reference."""

    def checkpoint_state(self) -> dict:
        return {POLICY_IS_REFERENCE: True}


class LoraReference(ReferencePolicy):
    """The policy with its LoRA adapters off: the base weights are the reference, at no memory cost.

    `refresh_from` merges the adapters into the base weights (which makes the reference equal to
    the policy, up to the rounding of the merge), starts fresh adapters (B = 0: the policy's outputs
    do not change) and zeroes their optimizer state; the lr schedule goes on. The number of merges is
    checkpointed: it seeds the next fresh adapters, so a resumed run draws the same ones.
    """

    def __init__(self, policy: nn.Module, settings: lora.LoraSettings) -> None:
        self.policy, self.settings = policy, settings
        self.merges = 0

    @contextlib.contextmanager
    def active(self) -> Iterator[nn.Module]:
        module = unwrap(self.policy)  # without DDP: no gradient sync; an FSDP2 module stays sharded
        was_training = module.training
        module.eval()
        try:
            with lora.adapters_disabled(module), torch.no_grad():
                yield module
        finally:
            module.train(was_training)

    def state_dict(self) -> dict[str, Tensor]:
        return lora.base_state_dict(unwrap(self.policy).state_dict())

    def full_state_dict(self) -> dict[str, Tensor]:
        return lora.base_state_dict(parallel.full_state_dict(self.policy))

    def refresh_from(self, policy: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        module = unwrap(policy)
        lora.merge_adapters(module, self.settings.scaling)
        self.merges += 1
        lora.fresh_adapters(module, self.settings, self.merges)
        if optimizer is not None:
            lora.reset_optimizer_state(optimizer)

    def checkpoint_state(self) -> dict:
        return {"merges": self.merges}

    def restore(self, read_weights: Callable[[str], dict[str, Tensor]], state: dict) -> None:
        self.merges = int(state.get("merges", 0))  # the base weights and adapters came with the policy's
