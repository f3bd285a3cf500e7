"""RNG states: every stream (torch, numpy, Python `random`) continues exactly after a checkpoint round trip."""

import logging
import random

import numpy as np
import torch

from spinlm.utils import rng
from spinlm.utils.statefile import load_state, save_state


def _draws():
    """Values from every stream, including the cached second normal of numpy and Python (gauss)."""
    return (torch.rand(3).tolist(), torch.randn(1).tolist(), np.random.rand(3).tolist(), np.random.normal(),
            np.random.normal(), random.random(), random.gauss(0, 1), random.getrandbits(64))


def test_capture_and_restore_through_a_state_file(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.normal()  # leaves a cached gaussian (has_gauss=1) in numpy's state
    random.gauss(0, 1)  # and in Python's (gauss_next)
    save_state(rng.capture(), tmp_path / "rng.state.safetensors")
    expected = _draws()
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    rng.restore(load_state(tmp_path / "rng.state.safetensors"))
    assert _draws() == expected


def test_previous_format_restores_torch_and_says_what_it_lacks(caplog):
    torch.manual_seed(5)
    state = {"torch": torch.get_rng_state(), "cuda": None}
    expected = torch.rand(4)
    with caplog.at_level(logging.WARNING, logger="spinlm.utils.rng"):
        rng.restore(state)
    assert torch.equal(torch.rand(4), expected)
    assert "numpy / Python `random`" in caplog.text
