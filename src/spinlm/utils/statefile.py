"""Checkpoint states (optimizer, scheduler, RNG, ...) in files that load without running code.

A state is any tree of plain containers (dict, list, tuple) holding None, bool, int, float, str
and torch tensors. `save_state` writes it as one safetensors file: the tensors, plus the tree as
JSON in the file's metadata header, each tensor replaced by a reference. `load_state` parses that
JSON and the raw tensor bytes: no pickle, so a hostile file can at worst fail to load.

In the JSON tree, lists, strings, ints, finite floats, booleans and null stand for themselves;
every object is a one-key tag:
  {"dict": {...}}            a dict whose keys are all strings
  {"items": [[k, v], ...]}   any other dict (e.g. optimizer state keyed by parameter position)
  {"tuple": [...]}, {"tensor": "<name in the file>"}, {"float": "nan" | "inf" | "-inf"}

Checkpoints written before this format hold `name.pt` files (torch.save pickles). `load_legacy_pt`
reads them with `torch.load(weights_only=True)` and nothing added to its allow-list: the states
spinlm wrote are plain, so they load; a file that needs any other Python object is refused.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from spinlm.errors import CheckpointError

SUFFIX = ".state.safetensors"  # a state named "optimizer" lives in optimizer.state.safetensors
LEGACY_SUFFIX = ".pt"
_TREE = "spinlm_state"  # the metadata key holding the JSON tree


def save_state(state: Any, path: str | Path) -> None:
    """Write `state` (plain containers of numbers, strings and tensors) to `path`; TypeError names
    the first value of another type (a numpy array, a custom object): convert it before saving."""
    tensors: dict[str, Tensor] = {}
    tree = _encode(state, tensors, {}, set(), "state")
    save_file(tensors, str(path), metadata={"format": "pt", _TREE: json.dumps(tree, allow_nan=False)})


def load_state(path: str | Path) -> Any:
    """The state saved by `save_state`; CheckpointError naming the file if it is not one."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tree = json.loads((f.metadata() or {})[_TREE])
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        return _decode(tree, tensors)
    except KeyError:
        raise CheckpointError(f"{path}: not a spinlm state file (no '{_TREE}' in its header)") from None
    except (SafetensorError, OSError, ValueError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not a readable spinlm state file ({_first_line(e)})") from None


def load_legacy_pt(path: str | Path) -> Any:
    """A state of the previous format (`torch.save`), read with `weights_only=True`: only tensors and
    plain containers. Anything else (a pickled object whose loading would run code) is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: refused: it holds pickled Python objects ({_unsafe_globals(path)}) that loading would run "
            "as code, and spinlm never writes those; if the checkpoint comes from a source you trust, convert "
            f"it with `spinlm convert-checkpoint {Path(path).parent} --trusted` (that runs pickle)"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({_first_line(e)})") from None


def _unsafe_globals(path: str | Path) -> str:
    """What a pickle would import, read from its opcodes without running them."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint: the names stay unknown  # noqa: BLE001
        names = []
    return "needs " + ", ".join(names) if names else "not plain tensors and containers"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _encode(obj: Any, tensors: dict[str, Tensor], names: dict[int, str], storages: set[int], where: str) -> Any:
    if obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else {"float": repr(float(obj))}
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, Tensor):
        return {"tensor": _add_tensor(obj, tensors, names, storages)}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, tensors, names, storages, f"{where}[{i}]") for i, v in enumerate(obj)]
        return {"tuple": items} if isinstance(obj, tuple) else items
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"dict": {str(k): _encode(v, tensors, names, storages, f"{where}[{k!r}]") for k, v in obj.items()}}
        return {"items": [[_encode(k, tensors, names, storages, f"{where} key {k!r}"),
                           _encode(v, tensors, names, storages, f"{where}[{k!r}]")] for k, v in obj.items()]}
    raise TypeError(
        f"checkpoint {where} is a {type(obj).__module__}.{type(obj).__qualname__}: a checkpoint state holds only "
        "dicts, lists, tuples, None, bool, int, float, str and torch tensors (convert it, e.g. a numpy array "
        "with torch.from_numpy)"
    )


def _add_tensor(t: Tensor, tensors: dict[str, Tensor], names: dict[int, str], storages: set[int]) -> str:
    """The tensor's name in the file; the same tensor object twice is stored once (and loads as one object)."""
    if id(t) in names:
        return names[id(t)]
    data = t.detach().cpu()
    storage = data.untyped_storage().data_ptr()
    if storage in storages or not data.is_contiguous():  # safetensors refuses memory shared between entries
        data = data.contiguous().clone()
    storages.add(data.untyped_storage().data_ptr())
    name = names[id(t)] = str(len(tensors))
    tensors[name] = data
    return name


def _decode(node: Any, tensors: dict[str, Tensor]) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if isinstance(node, dict) and len(node) == 1:
        (tag, value), = node.items()
        if tag == "dict" and isinstance(value, dict):
            return {k: _decode(v, tensors) for k, v in value.items()}
        if tag == "items" and isinstance(value, list) and all(isinstance(p, list) and len(p) == 2 for p in value):
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value}
        if tag == "tuple" and isinstance(value, list):
            return tuple(_decode(v, tensors) for v in value)
        if tag == "tensor" and isinstance(value, str) and value in tensors:
            return tensors[value]
        if tag == "float" and value in ("nan", "inf", "-inf"):
            return float(value)
    raise ValueError(f"unexpected entry {json.dumps(node)[:80]}")
