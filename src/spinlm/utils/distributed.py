"""torch.distributed as torchrun starts it: process-group setup, rank helpers, small collectives.

One process (plain `python -m spinlm`, no torchrun) is world size 1 and every helper is a
no-op, so the trainer calls them unconditionally. With torchrun (WORLD_SIZE > 1 in the
environment) `init_distributed` joins the process group: gloo on CPU, nccl on CUDA.

The collectives here carry decisions and metrics (and, for an inference engine on every rank,
rank 0's weights): the ranks must agree on when to stop (wall-time, a non-finite loss), which
checkpoint to resume and which rollouts to reuse, or one rank leaves a loop while the others wait
in a collective forever.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import sys
from dataclasses import dataclass
from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from spinlm.errors import ConfigError

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, world size, rank on its node, processes per node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def env_info() -> DistInfo:
    """The launcher's view (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistInfo(
        rank=int(os.environ.get("RANK", "0")),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
    )


def info() -> DistInfo:
    """This process's place in the running process group (world size 1 without one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    env = env_info()
    return DistInfo(dist.get_rank(), dist.get_world_size(), env.local_rank, env.local_world_size)


def my_share(n: int, lockstep: bool = False, group_size: int = 1) -> list[int | None]:
    """This rank's items of `n`, dealt round-robin to the groups of `group_size` consecutive ranks (one
    group per rank by default; balanced when the items are sorted by cost). With `lockstep`, padded with
    None (a dummy item) to the count of the busiest group: under FSDP2 every forward is a collective."""
    d = info()
    groups = max(1, d.world_size // group_size)
    mine: list[int | None] = list(range(d.rank // group_size, n, groups))
    if lockstep:
        mine += [None] * (math.ceil(n / groups) - len(mine))
    return mine


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def init_distributed(accelerator: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment; world size 1 needs none.

    The backend follows the device: nccl when this rank trains on CUDA, gloo on CPU. Ranks
    other than 0 log warnings only, so a run prints each message once.
    """
    env = env_info()
    if env.world_size <= 1:
        return info()
    if not dist.is_initialized():
        use_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
        if use_cuda:
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group(backend=backend_for("cuda" if use_cuda else "cpu"))
    if dist.get_rank() != 0:
        logging.getLogger("spinlm").setLevel(logging.WARNING)
    return info()


def local_launch(devices: Any, num_nodes: int, accelerator: str, argv: list[str]) -> list[str] | None:
    """The command that starts `trainer.devices` processes of `spinlm train argv` on this machine when
    spinlm was started as one process, as Lightning starts a node's processes for NeMo: torchrun's
    launcher, standalone. None when there is nothing to start (one device, or already launched)."""
    if not isinstance(devices, int) or devices <= 1 or "WORLD_SIZE" in os.environ:
        return None
    if num_nodes > 1:
        raise ConfigError(f"config: trainer.num_nodes={num_nodes}: start spinlm on each node with torchrun "
                          f"(--nnodes {num_nodes} --nproc_per_node {devices}); see README, Multi-GPU / multi-node")
    cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if cuda and devices > torch.cuda.device_count():
        raise ConfigError(f"config: trainer.devices={devices} but {torch.cuda.device_count()} CUDA device(s) "
                          "are visible; lower trainer.devices")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}",
            "-m", "spinlm", "train", *argv]


def destroy_distributed() -> None:
    """Leave the process group while the interpreter is fully alive.

    A finished run's DDP/FSDP wrappers sit in reference cycles that hold the group and its gloo work
    objects; collected only at interpreter exit, they drop tensors from PyTorch's background threads
    during finalization, which can abort a rank that has finished its work (pytorch/pytorch#190489).
    Collecting them first makes the group's teardown happen here."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def _collective_device() -> torch.device:
    """nccl only moves CUDA tensors; gloo only CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if info().is_distributed:
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on at least one (stop / error decisions)."""
    if not info().is_distributed:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks of a few numbers (token counts, loss sums), in float64."""
    if not info().is_distributed:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def gather_rows(local: Tensor) -> Tensor:
    """Concatenate every rank's rows in rank order (equal row counts on every rank), on every rank."""
    if not info().is_distributed:
        return local
    device = _collective_device()
    t = local.detach().to(device).contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts).to(local.device)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's (picklable) object, in rank order, on every rank."""
    if not info().is_distributed:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_from_main(obj: T) -> T:
    """Rank 0's (picklable) object on every rank: the one answer all ranks act on."""
    if not info().is_distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_tensors_from_main(tensors: Mapping[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
    """Rank 0's named tensors on every rank, one at a time, so no rank holds a second full copy (weights
    for an inference engine; the other ranks' `tensors` are not read). A collective: every rank must
    consume the whole iterator, in step."""
    if not info().is_distributed:
        yield from tensors.items()
        return
    specs = broadcast_from_main([(n, tuple(t.shape), t.dtype) for n, t in tensors.items()] if info().is_main else None)
    device = _collective_device()
    for name, shape, dtype in specs:
        if info().is_main:
            t = tensors[name].detach().to(device).contiguous()
        else:
            t = torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(t, src=0)
        yield name, t
