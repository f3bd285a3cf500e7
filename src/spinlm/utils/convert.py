"""`spinlm convert-checkpoint STEP_DIR --trusted`: a previous-format checkpoint's `.pt` states to
safe state files (`statefile`), for a `.pt` that `torch.load(weights_only=True)` refuses.

THIS RUNS PICKLE: `torch.load(weights_only=False)` executes any code the files hold. Use it only on
a checkpoint you trust (one you wrote yourself, or a copy from a source you trust), never on a
file spinlm refused whose origin you do not know. The converted checkpoint then loads without it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spinlm.errors import CheckpointError
from spinlm.utils.manifest import manifest_problem, read_manifest, write_manifest
from spinlm.utils.statefile import LEGACY_SUFFIX, SUFFIX, save_state

log = logging.getLogger(__name__)


def convert_checkpoint(path: str | Path) -> list[Path]:
    """Rewrite every `.pt` state the manifest lists as `.state.safetensors` (RUNS PICKLE: trusted
    checkpoints only); the new manifest is written before the old files are removed. Returns the
    new files."""
    path = Path(path)
    problem = manifest_problem(path)  # links and entries outside the checkpoint are refused here too
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is incomplete or corrupt ({problem}); nothing converted")
    names = list(read_manifest(path))
    legacy = [name for name in names if name.endswith(LEGACY_SUFFIX)]
    written = []
    for name in legacy:
        log.warning("running pickle on %s (--trusted: it executes any code the file holds)", path / name)
        state = torch.load(path / name, map_location="cpu", weights_only=False)  # trusted by the caller
        target = path / (name[: -len(LEGACY_SUFFIX)] + SUFFIX)
        try:
            save_state(_plain(state), target)
        except TypeError as e:
            raise CheckpointError(f"{path / name}: cannot convert: {e}") from None
        written.append(target)
    write_manifest(path, [n for n in names if n not in legacy] + [p.name for p in written])
    for name in legacy:
        (path / name).unlink()
    return written


def _plain(obj: Any) -> Any:
    """numpy arrays and scalars as tensors and Python numbers; containers rebuilt as plain ones."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.array(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {_plain(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_plain(v) for v in obj]
        return tuple(items) if isinstance(obj, tuple) else items
    return obj
