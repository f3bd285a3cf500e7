"""fp32 linear layers through oneDNN on CPUs where it beats PyTorch's default BLAS.

PyTorch sends an fp32 matmul on the CPU to MKL, and MKL runs its AVX2 code on AMD processors
even when they have AVX-512: on the 2-core EPYC this project is measured on, a 2048^3 product
runs at ~195 GFLOP/s through ``torch.mm`` and ~425 GFLOP/s through oneDNN (bundled with
PyTorch). A GPT spends nearly all its FLOPs in linear layers, so `use_onednn_linears` swaps
them for `OneDNNLinear`: forward and both backward products through oneDNN, same fp32 maths
(results differ from MKL's by float rounding only). Anything else (CUDA tensors, autocast,
other dtypes, empty inputs) takes the usual ``F.linear``.

``mode``: "auto" swaps when a quick measurement on this machine says oneDNN is faster, "onednn"
always (where oneDNN is available), "default" never.
"""

from __future__ import annotations

import functools
import time

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


def use_onednn_linears(model: nn.Module, mode: str = "auto") -> int:
    """Swap ``model``'s ``nn.Linear`` layers for `OneDNNLinear` in place when ``mode`` says so; how many."""
    if mode not in CPU_LINEAR_KERNELS:
        raise ValueError(f"cpu_linear_kernel must be one of {', '.join(CPU_LINEAR_KERNELS)}, got {mode!r}")
    if mode == "default" or not onednn_available() or (mode == "auto" and not onednn_is_faster()):
        return 0
    swapped = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
            swapped += 1
    return swapped


@functools.cache
def onednn_available() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        onednn_mm(torch.ones(2, 3), torch.ones(4, 3))
    except (RuntimeError, AttributeError):
        return False
    return True


@functools.cache
def onednn_is_faster(margin: float = 1.2) -> bool:
    """Whether oneDNN beats ``F.linear`` by ``margin`` on a GPT-sized product here (~0.1 s to measure)."""
    if not onednn_available():
        return False
    x, w = torch.randn(256, 576), torch.randn(1536, 576)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    with torch.inference_mode():
        return best(lambda: F.linear(x, w)) > margin * best(lambda: onednn_mm(x, w))
