"""Every random stream of a process (torch, CUDA, numpy, Python `random`) as plain tensors and numbers.

A checkpoint stores these states with `spinlm.utils.statefile` (no pickle), so they are plain
containers: numpy's MT19937 key and Python's Mersenne Twister words become int64 tensors.
Restoring them continues every stream exactly where the saved process left it.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def capture() -> dict[str, Any]:
    """This process's RNG states."""
    np_state = np.random.get_state(legacy=False)
    version, words, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss_next": gauss_next},
    }


def restore(state: dict[str, Any]) -> None:
    """Set the streams `capture` saved; a checkpoint of the previous format has only torch and CUDA."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" not in state or "python" not in state:
        log.warning("this checkpoint holds no numpy / Python `random` states (written before they were saved): "
                    "those streams continue from the seed")
        return
    n = state["numpy"]
    np.random.set_state({
        "bit_generator": n["bit_generator"],
        "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
        "has_gauss": n["has_gauss"], "gauss": n["gauss"],
    })
    p = state["python"]
    random.setstate((p["version"], tuple(p["words"].tolist()), p["gauss_next"]))
