"""State files: any plain container of tensors, numbers and strings round-trips; loading runs no code."""

import json
import math
import pickle
import re
from collections import OrderedDict

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from spinlm.errors import CheckpointError
from spinlm.utils.statefile import load_legacy_pt, load_state, save_state
from untrusted import RunsCode, poisoned_pt


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if isinstance(a, dict):
        return type(b) is dict and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_plain_containers_round_trip(tmp_path):
    shared = torch.arange(6, dtype=torch.float32)
    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": shared}, 1: {}},  # int keys, as optimizer.state_dict()
        "param_groups": [{"betas": (0.9, 0.98), "params": [0, 1], "foreach": None, "fused": True, "lr": 1e-3}],
        "again": shared,  # the same tensor twice: stored once, loads as one object
        "view": shared[2:4], "transposed": shared.view(2, 3).t(),
        "dtypes": [torch.ones(2, dtype=d)
                   for d in (torch.bfloat16, torch.float16, torch.uint8, torch.int64, torch.bool)],
        "empty": [torch.zeros(0), torch.zeros(0, 3, dtype=torch.int32)],
        "floats": [float("nan"), float("inf"), float("-inf"), -0.0, 1e-300],
        "ints": [0, -1, 2**70], "strings": ["", "é", "{\"tensor\": \"0\"}"], "flags": [True, False, None],
        (1, "tuple key"): "x", None: 1.5, 2.5: "float key",
        "nested": [[(), []], {"dict": {"tuple": 1}}],  # keys that look like the format's own tags
    }
    save_state(state, tmp_path / "s.state.safetensors")
    loaded = load_state(tmp_path / "s.state.safetensors")
    expected = {**state, "transposed": state["transposed"].contiguous()}
    assert _same(expected, loaded)
    assert loaded["again"] is loaded["state"][0]["exp_avg"]
    assert math.copysign(1.0, loaded["floats"][3]) == -1.0


def test_top_level_scalar_and_ordered_dict(tmp_path):
    for value in (None, 3, "s", [1, (2,)]):
        save_state(value, tmp_path / "v")
        assert _same(value, load_state(tmp_path / "v"))
    save_state(OrderedDict(b=1, a=torch.ones(1)), tmp_path / "o")
    assert list(load_state(tmp_path / "o")) == ["b", "a"]


@pytest.mark.parametrize("bad, where", [
    ({"rng": {"key": np.zeros(3)}}, "state['rng']['key'] is a numpy.ndarray"),
    ([1, {2: object()}], "state[1][2] is a builtins.object"),
    ({"f": lambda: 1}, "state['f'] is a builtins.function"),
    ({"i": np.int64(3)}, "state['i'] is a numpy.int64"),
])
def test_anything_else_is_refused_when_saving(tmp_path, bad, where):
    with pytest.raises(TypeError, match=re.escape(f"checkpoint {where}")):
        save_state(bad, tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_a_pickle_named_like_a_state_file_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "optimizer.state.safetensors"
    path.write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(CheckpointError, match="optimizer.state.safetensors: not a readable spinlm state file"):
        load_state(path)
    assert not marker.exists()


@pytest.mark.parametrize("tree, message", [
    (None, "no 'spinlm_state'"),
    ('{"tensor": "7"}', "unexpected entry"),
    ('{"object": "os.system"}', "unexpected entry"),
    ('{"dict": {}, "tuple": []}', "unexpected entry"),
    ('{"items": [[[1], 2]]}', "unhashable"),
    ("[" * 100_000 + "]" * 100_000, "spinlm state file"),
    ("not json", "spinlm state file"),
])
def test_malformed_state_files_are_refused(tmp_path, tree, message):
    path = tmp_path / "x.state.safetensors"
    save_file({"0": torch.ones(1)}, str(path), metadata=None if tree is None else {"spinlm_state": tree})
    with pytest.raises(CheckpointError, match=message):
        load_state(path)


def test_legacy_pt_of_plain_states_loads(tmp_path):
    state = {"state": {0: {"step": torch.tensor(2.0)}}, "param_groups": [{"betas": (0.9, 0.98), "params": [0]}]}
    torch.save(state, tmp_path / "optimizer.pt")
    assert _same(state, load_legacy_pt(tmp_path / "optimizer.pt"))


def test_legacy_pt_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "marker"
    path = poisoned_pt(tmp_path / "optimizer.pt", marker)
    with pytest.raises(CheckpointError) as err:
        load_legacy_pt(path)
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message and "builtins.exec" in message
    assert f"spinlm convert-checkpoint {tmp_path} --trusted" in message and "runs pickle" in message
    assert not marker.exists()


def test_legacy_pt_with_numpy_is_refused_not_loaded(tmp_path):
    torch.save({"numpy": np.random.get_state()}, tmp_path / "rng.pt")
    with pytest.raises(CheckpointError, match="rng.pt: refused: .*numpy"):
        load_legacy_pt(tmp_path / "rng.pt")


def test_garbage_legacy_pt_is_unreadable(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="x.pt"):
        load_legacy_pt(tmp_path / "x.pt")


def test_the_tree_is_plain_json(tmp_path):
    """The header holds JSON a reviewer can read, tensors referenced by name."""
    from safetensors import safe_open

    save_state({"a": (1, torch.ones(2))}, tmp_path / "s")
    with safe_open(str(tmp_path / "s"), "pt") as f:
        assert json.loads(f.metadata()["spinlm_state"]) == {"dict": {"a": {"tuple": [1, {"tensor": "0"}]}}}
