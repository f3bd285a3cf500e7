"""What `trainer.precision` means for each tensor: the policy's weights and gradients, its compute, the reference.

| precision | policy weights + gradients | matmuls | AdamW keeps | reference | bytes/param |
|---|---|---|---|---|---|
| `32` | fp32 | fp32 | fp32 m, v (8) | fp32 (4) | 4 + 4 + 8 + 4 = 20 |
| `bf16-mixed` | fp32 | bf16 (autocast) | fp32 m, v (8) | linear layers bf16 (~2) | 4 + 4 + 8 + ~2 = ~18 |
| `16-mixed` | fp32 | fp16 (autocast) | fp32 m, v (8) | linear layers fp16 (~2) | ~18 |
| `bf16` | bf16 | bf16 | fp32 m, v + the low 16 bits of an fp32 master weight (10) | bf16 (2) | 2 + 2 + 10 + 2 = 16 |

The frozen reference needs no master weights: it holds every weight in the dtype the policy's
forward computes with. Under autocast that is the low-precision dtype for the weights of linear
layers (autocast casts them for every matmul) and fp32 for the rest (embeddings, norms), so the
reference's forward is the policy's forward, value for value: at a step where policy == reference
the margin stays 0 up to kernel rounding, and generation casts no weight per decoding step. A tied
embedding / LM head is untied in the reference (an fp32 table to look up, a low-precision copy to
multiply by). Under `bf16` the policy itself is bf16 and the reference a plain copy.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn

from spinlm.config import PRECISIONS
from spinlm.errors import ConfigError


@dataclass(frozen=True)
class Precision:
    """The dtypes of one `trainer.precision` value."""

    name: str
    param_dtype: torch.dtype  # the policy's weights and gradients
    autocast_dtype: torch.dtype | None  # mixed precision: the dtype autocast computes matmuls in

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.autocast_dtype or self.param_dtype

    @property
    def is_bf16(self) -> bool:
        """Pure bf16 weights: the optimizer keeps the master weights' low bits (`bf16_adamw`)."""
        return self.param_dtype == torch.bfloat16

    def autocast(self, device_type: str):
        """The context every forward runs in (autocast for the mixed modes, nothing otherwise)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.autocast_dtype)

    def bytes_per_param(self) -> dict[str, float]:
        """Bytes per parameter the run holds besides activations: policy weights, gradients, AdamW state, and a
        frozen reference copy where a run keeps one (`reference_kind`; ~2 for the mixed modes' copy: its
        embeddings and norms stay fp32)."""
        weights = self.param_dtype.itemsize
        optimizer = 8 + (2 if self.is_bf16 else 0)
        return {"weights": weights, "gradients": weights, "optimizer": optimizer,
                "reference": self.compute_dtype.itemsize}


def precision_of(value: str | int) -> Precision:
    """`trainer.precision` -> Precision; ConfigError naming the key for an unknown value."""
    name = str(value)
    if name not in PRECISIONS:
        raise ConfigError(f"config: trainer.precision must be one of {PRECISIONS}, got {value!r}")
    if name == "bf16":
        return Precision(name, torch.bfloat16, None)
    if name == "bf16-mixed":
        return Precision(name, torch.float32, torch.bfloat16)
    if name == "16-mixed":
        return Precision(name, torch.float32, torch.float16)
    return Precision(name, torch.float32, None)


def frozen_copy(module: nn.Module, precision: Precision) -> nn.Module:
    """A frozen (no grad, eval) copy of `module`, each weight stored as `precision`'s forward computes with it.

    Parameters are converted one by one while copying (no transient full-precision second copy).
    """
    low = precision.autocast_dtype
    linear = {id(m.weight) for m in module.modules() if _is_linear(m)}
    linear |= {id(m.bias) for m in module.modules() if _is_linear(m) and m.bias is not None}
    memo: dict[int, nn.Parameter] = {}
    for p in module.parameters():
        dtype = low if low is not None and id(p) in linear and _only_in_linears(module, p) else p.dtype
        memo[id(p)] = nn.Parameter(p.detach().to(dtype, copy=True), requires_grad=False)
    ref = copy.deepcopy(module, memo)
    if low is not None:
        _untie_linears(ref, low)
    ref.requires_grad_(False)
    return ref.eval()


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear)


def _only_in_linears(module: nn.Module, param: nn.Parameter) -> bool:
    """False for a weight a linear layer shares with another module (a tied embedding)."""
    owners = [m for m in module.modules() if any(p is param for p in m.parameters(recurse=False))]
    return all(_is_linear(m) for m in owners)


def _untie_linears(ref: nn.Module, dtype: torch.dtype) -> None:
    """Give each linear layer whose weight is shared with a non-linear module (tied LM head) its own copy in `dtype`."""
    for m in ref.modules():
        if _is_linear(m) and m.weight.dtype != dtype:
            m.weight = nn.Parameter(m.weight.detach().to(dtype, copy=True), requires_grad=False)
