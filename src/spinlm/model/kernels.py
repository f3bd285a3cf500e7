"""fp32 linear layers through oneDNN on CPUs where it beats PyTorch's default BLAS.

PyTorch sends an fp32 matmul on the CPU to MKL, and MKL runs its AVX2 code on AMD processors
even when they have AVX-512: on the 2-core EPYC this project is measured on, a 2048^3 product
runs at ~195 GFLOP/s through ``torch.mm`` and ~425 GFLOP/s through oneDNN (bundled with
PyTorch). A GPT spends nearly all its FLOPs in linear layers, so `use_onednn_linears` swaps
them for `OneDNNLinear`: forward and both backward products through oneDNN, same fp32 maths
(results differ from MKL's by float rounding only). Anything else (CUDA tensors, autocast,
other dtypes, empty inputs) takes the usual ``F.linear``.

Which kernel runs changes the float rounding, so the choice is never a timing: ``auto`` follows a
fixed rule on the CPU's vendor (`resolve_cpu_linear_kernel`: oneDNN on AMD, where MKL takes its
AVX2 path; PyTorch's default elsewhere). The trainer resolves it once per run on rank 0, records
it in every checkpoint and reuses the recorded kernel on resume, so a resumed process, every rank
and every run of the same command compute the same numbers whatever the machine's load.
``onednn`` and ``default`` force one kernel.

bf16 tensors (`trainer.precision=bf16`, and the reference's linear layers under bf16-mixed) take
``F.linear``: PyTorch already sends bf16 CPU products to oneDNN's AVX512-BF16 kernels
(brg_matmul:avx512_core_bf16), ~2x oneDNN's fp32 rate here (benchmarks/precision_bench.py).
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spinlm.config import CPU_LINEAR_KERNELS


def onednn_mm(a: Tensor, b: Tensor) -> Tensor:
    """a @ b.T for 2D fp32 CPU tensors, by oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


class _OneDNNLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return onednn_mm(x.reshape(-1, x.shape[-1]), weight).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = None
        # oneDNN reads transposed views as they are (a copy first is slower)
        if ctx.needs_input_grad[0]:  # g @ W
            grad_x = onednn_mm(g, weight.t()).reshape(x.shape)
        if ctx.needs_input_grad[1]:  # g.T @ x
            grad_w = onednn_mm(g.t(), x.reshape(-1, x.shape[-1]).t())
        return grad_x, grad_w


class OneDNNLinear(nn.Linear):
    """An ``nn.Linear`` whose fp32 CPU products go through oneDNN (same parameters, same state dict)."""

    def forward(self, x: Tensor) -> Tensor:
        if not _onednn_applies(x, self.weight):
            return F.linear(x, self.weight, self.bias)
        y = _OneDNNLinearFunction.apply(x, self.weight)
        return y if self.bias is None else y + self.bias


def _onednn_applies(x: Tensor, weight: Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.numel() > 0 and not torch.is_autocast_enabled("cpu"))


def use_onednn_linears(model: nn.Module, kernel: str = "auto") -> int:
    """Swap ``model``'s ``nn.Linear`` layers for `OneDNNLinear` in place when ``kernel`` resolves to
    oneDNN; returns how many were swapped."""
    if resolve_cpu_linear_kernel(kernel) != "onednn":
        return 0
    swapped = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
            swapped += 1
    return swapped


def contiguous_head_input(model: nn.Module) -> None:
    """Make the LM head's CPU input contiguous before its product.

    Decoding asks transformers for the last position's logits only (``logits_to_keep=1``), which
    hands the head a strided (B, 1, H) view of the hidden states. PyTorch's CPU bf16 matmul then
    expands the weight once per row: for a 49k x 1024 head and 8 rows, 768 MiB and ~3 s instead of
    2 MiB and 15 ms (fp32: ~2x slower). Copying the (B, 1, H) input costs nothing."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Linear) and not getattr(head, "_spinlm_contiguous_input", False):
        head.register_forward_pre_hook(_contiguous_cpu_input)
        head._spinlm_contiguous_input = True


def _contiguous_cpu_input(module: nn.Module, args: tuple) -> tuple | None:
    x = args[0] if args else None
    if isinstance(x, Tensor) and x.device.type == "cpu" and not x.is_contiguous():
        return (x.contiguous(), *args[1:])
    return None


def linear_kernel_in_use(model: nn.Module) -> str:
    """The kernel a loaded model runs: onednn when its linear layers are `OneDNNLinear`, else default."""
    return "onednn" if any(isinstance(m, OneDNNLinear) for m in model.modules()) else "default"


# CPU vendors whose MKL path is the generic AVX2 one (MKL picks its fast code by vendor)
_ONEDNN_VENDORS = ("AuthenticAMD", "HygonGenuine")


def resolve_cpu_linear_kernel(kernel: str) -> str:
    """``model.cpu_linear_kernel`` -> "onednn" or "default", by a fixed rule (never a timing).

    auto: oneDNN on x86 CPUs of the vendors above, where it measured ~2x MKL's fp32 rate (see the
    module docstring), provided oneDNN runs here; PyTorch's default BLAS elsewhere."""
    if kernel not in CPU_LINEAR_KERNELS:
        raise ValueError(f"cpu_linear_kernel must be one of {', '.join(CPU_LINEAR_KERNELS)}, got {kernel!r}")
    if kernel == "auto":
        kernel = "onednn" if cpu_vendor() in _ONEDNN_VENDORS else "default"
    return "onednn" if kernel == "onednn" and onednn_available() else "default"


@functools.cache
def cpu_vendor() -> str:
    """The CPU's vendor id (e.g. AuthenticAMD, GenuineIntel); "" when it cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() if platform.system() == "Darwin" else ""


@functools.cache
def onednn_available() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        onednn_mm(torch.ones(2, 3), torch.ones(4, 3))
    except (RuntimeError, AttributeError):
        return False
    return True
