"""Atomic, verifiable checkpoints: a directory per step, written under a temporary name and renamed.

Layout of `checkpoints/step_000042/`: one `.safetensors` file per module (policy, reference),
one `.pt` per other state (optimizer, scheduler, RNG), `trainer_state.json`, and last
`manifest.json` with each file's size and SHA-256. A directory without a matching manifest
(a crash mid-write, a corrupt disk) is skipped with a warning and the previous one is used.
NaN/inf weights are never written. Retention: the newest `keep_last` (save_top_k; -1 keeps
all) plus the best by the monitored metric.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import Tensor, nn

from spinlm.errors import CheckpointError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file so that a reader sees the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    _fsync(tmp)
    os.replace(tmp, path)


def refuse_non_finite(module: nn.Module | Mapping[str, Tensor], what: str) -> None:
    """CheckpointError naming the first parameter holding NaN/inf: such weights are never written."""
    named = module.named_parameters() if isinstance(module, nn.Module) else module.items()
    for name, param in named:
        if not torch.isfinite(param.detach()).all():
            raise CheckpointError(f"refusing to save {what}: parameter {name} holds NaN/inf values")


def check_same_layout(saved: dict | None, current: dict) -> None:
    """CheckpointError when the run's data layout differs from the checkpoint's (old checkpoints: no check)."""
    if not saved:
        return
    changed = [f"{key} was {saved[key]!r}, now {value!r}" for key, value in current.items()
               if key in saved and saved[key] != value]
    if changed:
        raise CheckpointError(
            f"the checkpoint does not match this run ({'; '.join(changed)}): resume with the config and data it "
            "was written with, or start in a new exp_manager.explicit_log_dir"
        )


def _test_delay() -> None:
    delay = os.environ.get("SPINLM_TEST_SAVE_DELAY")
    if delay:
        time.sleep(float(delay))


def _without_shared(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop later names of a tensor already present (tied weights); safetensors refuses shared memory."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    out = {}
    for name, t in state.items():
        key = (t.data_ptr(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            out[name] = t.contiguous()
    return out


class Checkpointer:
    """Saves and finds checkpoints in one directory; keeps the newest `keep_last` plus the best."""

    def __init__(self, directory: str | Path, keep_last: int = 3, monitor: str = "val_loss", mode: str = "min"):
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.monitor = monitor
        self.mode = mode
        self._just_verified: Path | None = None  # latest()'s answer: load() need not hash it again

    def save(
        self, step: int, modules: dict[str, nn.Module | Mapping[str, Tensor]], states: dict[str, Any], meta: dict
    ) -> Path:
        """Write `step_{step}/` atomically: a temp dir, every file fsynced, the manifest last, one rename.

        Weights that are not finite are refused (CheckpointError) before anything is written; a save
        that fails part-way removes its temp dir, so the previous checkpoints stay the newest."""
        for name, module in modules.items():
            refuse_non_finite(module, f"{name} at step {step}")
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"step_{step:06d}"
        tmp = self.directory / f".tmp_step_{step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            self._write(tmp, modules, states, meta)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync(self.directory)
        self._prune()
        return final

    @staticmethod
    def _write(tmp: Path, modules: dict[str, nn.Module | Mapping[str, Tensor]], states: dict[str, Any], meta: dict) -> None:
        for name, module in modules.items():
            if isinstance(module, nn.Module):
                save_model(module, str(tmp / f"{name}.safetensors"))
            else:  # a full state dict (gathered from ranks): each tied tensor once, as save_model does
                save_file(_without_shared(module), str(tmp / f"{name}.safetensors"), metadata={"format": "pt"})
        _test_delay()  # SPINLM_TEST_SAVE_DELAY: lets tests kill a process in the middle of a save
        for name, state in states.items():
            torch.save(state, tmp / f"{name}.pt")
        (tmp / STATE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        for p in files:
            _fsync(p)
        manifest = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        _fsync(tmp / MANIFEST)
        _fsync(tmp)

    def is_valid(self, path: Path) -> bool:
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
            return all(
                (path / name).stat().st_size == entry["bytes"] and _sha256(path / name) == entry["sha256"]
                for name, entry in manifest.items()
            )
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def step_dirs(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        dirs = [p for p in self.directory.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
        return sorted(dirs, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))

    def latest(self) -> Path | None:
        """The newest checkpoint whose manifest verifies; broken ones are reported and skipped."""
        for path in reversed(self.step_dirs()):
            if self.is_valid(path):
                self._just_verified = path
                return path
            log.warning("checkpoint %s is incomplete or corrupt; trying the previous one", path)
        return None

    def load(self, path: Path, modules: dict[str, nn.Module]) -> tuple[dict[str, Any], dict]:
        """Load weights into `modules`; return (other states, trainer meta)."""
        verified, self._just_verified = path == self._just_verified, None
        if not verified and not self.is_valid(path):
            raise CheckpointError(f"checkpoint {path} is incomplete or corrupt (manifest does not match)")
        for name, module in modules.items():
            load_model(module, str(path / f"{name}.safetensors"))
        states = {
            p.stem: torch.load(p, map_location="cpu", weights_only=False) for p in sorted(path.glob("*.pt"))
        }
        meta = json.loads((path / STATE).read_text(encoding="utf-8"))
        return states, meta

    @staticmethod
    def weights(path: Path, name: str) -> dict[str, Tensor]:
        """The tensors of `{name}.safetensors` in a checkpoint (a tied weight appears under one name)."""
        return load_file(str(path / f"{name}.safetensors"))

    def _metric(self, path: Path) -> float | None:
        try:
            value = json.loads((path / STATE).read_text(encoding="utf-8")).get(self.monitor)
        except (OSError, ValueError):
            return None
        if value is None:
            return None
        value = float(value)
        return value if math.isfinite(value) else None  # a NaN/inf metric (diverged run) is never "best"

    def _prune(self) -> None:
        """Keep the newest `keep_last` (-1: all; 0: the newest only, for resuming) plus the best."""
        for stale in self.directory.glob(".tmp_step_*"):  # left by a crash mid-save
            shutil.rmtree(stale, ignore_errors=True)
        dirs = self.step_dirs()
        if self.keep_last < 0:
            return
        keep = set(dirs[-self.keep_last:]) if self.keep_last > 0 else set(dirs[-1:])
        scored = [(m, p) for p in dirs if (m := self._metric(p)) is not None]
        if scored:
            best = (min if self.mode == "min" else max)(scored, key=lambda mp: mp[0])[1]
            keep.add(best)
        for p in dirs:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)
