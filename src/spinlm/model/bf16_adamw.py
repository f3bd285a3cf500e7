"""AdamW for bf16 parameters (`trainer.precision=bf16`), with exact fp32 master weights in 2 extra bytes.

An fp32 number is a bf16 number (its high 16 bits) plus 16 more bits of mantissa. The bf16 weight the
model computes with is the fp32 master weight rounded to nearest; the optimizer keeps the signed
remainder of its bit pattern (`master_low`: int16 bits, in a bf16-typed tensor). Together they are the
fp32 master weight, exactly, so every update is fp32 AdamW's however small it is. Plain bf16 AdamW
rounds away any update below half a bf16 spacing (2^-9 of the weight): at SPIN's usual lr (5e-7 at 7B,
weights ~1e-2) that is nearly every update. The moments stay fp32: with beta2 = 0.999 the second moment
moves by 0.1% a step, below bf16's resolution.

Bytes per parameter: bf16 weight 2 + bf16 gradient 2 + fp32 exp_avg 4 + fp32 exp_avg_sq 4 + low bits 2 = 14
(bf16 weights with a separate fp32 master: 16; fp32 training: 16). The update is torch's single-tensor
AdamW, operation for operation, on the master weight (the test compares them bitwise); it runs in chunks,
so its fp32 temporaries stay small. Works on FSDP2 shards (elementwise on each rank's local shard).
Gradients accumulate over micro batches in bf16 (each addition rounds to 2^-9 relative).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

_HALF = 1 << 16  # the low 16 bits of an fp32 bit pattern
# the int16 remainder is stored typed as bf16 (same bits): checkpoint gathering and loading move bf16 tensors
# as raw bytes, and NCCL and gloo have no int16
_STATE_DTYPES = {"exp_avg": torch.float32, "exp_avg_sq": torch.float32, "master_low": torch.bfloat16}


def master_weight(high: Tensor, low: Tensor) -> Tensor:
    """The fp32 master weight from its bf16 rounding `high` and the remainder `low` (int16 bits, any 2-byte
    dtype), as a new tensor."""
    bits = high.view(torch.int16).to(torch.int32).mul_(_HALF).add_(low.view(torch.int16))
    return bits.view(torch.float32)


def split_master(master: Tensor, high: Tensor, low: Tensor) -> None:
    """Store the fp32 `master` as its bf16 rounding (into `high`) and the remainder's int16 bits (into `low`).

    On the bit pattern read as int32 (sign and magnitude), rounding to the nearest multiple of 2^16
    rounds the magnitude to the nearest bf16 (ties away from zero); the remainder is in [-2^15, 2^15).
    """
    bits = master.view(torch.int32)
    top = bits.add(_HALF // 2).bitwise_right_shift_(16)  # floor((bits + 2^15) / 2^16)
    low.view(torch.int16).copy_(bits - top * _HALF)
    high.view(torch.int16).copy_(top)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _flat(t: Tensor) -> Tensor:
    if not t.is_contiguous():
        raise ValueError("BF16AdamW needs contiguous parameters and states")
    return t.view(-1)


class BF16AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) on bf16 parameters with fp32 moments and exact fp32 master weights."""

    def __init__(self, params: Iterable[Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, chunk_size: int = 1 << 20) -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.chunk_size = chunk_size  # elements updated at a time: bounds the fp32 temporaries (~4 MB each)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype != torch.bfloat16:
                    raise TypeError(f"BF16AdamW takes bf16 parameters, got {p.dtype}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    for key, dtype in _STATE_DTYPES.items():
                        state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
                state["step"] += 1
                self._update(group, float(state["step"]), p, p.grad, state)
        return loss

    def _update(self, group: dict, step: float, p: Tensor, grad: Tensor, state: dict) -> None:
        """torch's `_single_tensor_adam` with decoupled weight decay, on the master weight, chunk by chunk."""
        lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        step_size = lr / bias_correction1
        tensors = [_flat(_local(t)) for t in (p, grad, state["exp_avg"], state["exp_avg_sq"], state["master_low"])]
        for weight, g, exp_avg, exp_avg_sq, low in zip(*(t.split(self.chunk_size) for t in tensors)):
            master = master_weight(weight, low)
            g = g.float()
            if weight_decay != 0:
                master.mul_(1 - lr * weight_decay)
            exp_avg.lerp_(g, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            master.addcdiv_(exp_avg, denom, value=-step_size)
            split_master(master, weight, low)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, except that the moments stay fp32 (torch casts every floating state to the parameter's
        dtype) and every tensor is copied. A state without low bits (saved by
        torch's AdamW) starts them at 0."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params):
            if pid not in saved:
                continue
            if isinstance(saved[pid].get("step"), Tensor):  # a copy: the caller's dict is not stepped
                self.state[p]["step"] = saved[pid]["step"].detach().clone().float().cpu()
            for key, dtype in _STATE_DTYPES.items():
                value = saved[pid].get(key)
                if value is None:
                    self.state[p][key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
                else:
                    self.state[p][key] = value.to(device=p.device, dtype=dtype, copy=True)
