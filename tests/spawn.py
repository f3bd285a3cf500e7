"""Run a function on N local CPU ranks (gloo), as torchrun would, and collect what each returns.

Each rank writes its stdout and stderr (C++ aborts and faulthandler's tracebacks included) to
`rank{r}.log`; a failed call quotes the end of every rank's log, so a crash in CI explains itself.
"""

from __future__ import annotations

import faulthandler
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, out_dir: str, target) -> None:
    log = open(Path(out_dir) / f"rank{rank}.log", "w")
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout.reconfigure(line_buffering=True)
    faulthandler.enable()  # a fatal signal prints every thread's Python stack to the log
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
    # the result is on disk: skip interpreter finalization, where PyTorch's background threads can still
    # drop Python references and abort the process (pytorch/pytorch#190489), which would fail a finished rank
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"ranks did not finish within {timeout}s (a collective hang?)")
    except (mp.ProcessRaisedException, mp.ProcessExitedException, TimeoutError) as e:
        raise RuntimeError(f"{e}\n{_log_tails(out_dir, world_size)}") from e
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def _log_tails(out_dir: Path, world_size: int, lines: int = 25) -> str:
    tails = []
    for r in range(world_size):
        path = out_dir / f"rank{r}.log"
        text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else ["(no log)"]
        tails.append(f"--- end of rank {r}'s log ---\n" + "\n".join(text))
    return "\n".join(tails)
