"""Run a function on N local CPU ranks (gloo), as torchrun would, and collect what each returns."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, out_dir: str, target) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size), HF_HUB_OFFLINE="1",
        OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false",
    )
    torch.set_num_threads(1)
    from spinlm.utils.distributed import destroy_distributed, init_distributed

    init_distributed("cpu")
    # arguments travel through a file: torch.multiprocessing would share their tensors' memory
    args = torch.load(Path(out_dir) / "args.pt", weights_only=False)
    try:
        result = target(rank, *args)
    finally:
        destroy_distributed()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def run_ranks(target, world_size: int, out_dir: Path, *args, timeout: float = 600.0) -> list:
    """`target(rank, *args)` on `world_size` spawned processes; returns their results in rank order.
    A rank that fails fails the call; a hang is killed after `timeout` seconds."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(args, out_dir / "args.pt")
    ctx = mp.start_processes(
        _entry, args=(world_size, free_port(), str(out_dir), target), nprocs=world_size,
        join=False, start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"ranks did not finish within {timeout}s (a collective hang?)")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
