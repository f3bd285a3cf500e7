"""Atomic, verifiable checkpoints: a directory per step, written under a temporary name and renamed.

Layout of `checkpoints/step_000042/`: one `.safetensors` file per module (policy, and a frozen
reference where the run keeps one: `model/reference.py`), one `.state.safetensors` per other state (optimizer,
scheduler, RNG, the reference's; see `statefile`),
`trainer_state.json`, and last `manifest.json` with each file's size and SHA-256. A directory
without a matching manifest (a crash mid-write, a corrupt disk) is skipped with a warning and the
previous one is used. NaN/inf weights are never written. Retention: the newest `keep_last`
(save_top_k; -1 keeps all) plus the best by the monitored metric.

Loading never runs code from the checkpoint, and reads only what its manifest lists: weights
and states are safetensors + JSON (previous-format `.pt` states load with weights_only=True or
are refused). The manifest sits beside the files, so it proves completeness, not origin: a
checkpoint is refused (CheckpointError, not skipped) when its directory, its manifest or a
listed file is a symbolic link, or an entry is not a plain file name (`../x`, `/abs`, `a/b`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import Tensor, nn

from spinlm.errors import CheckpointError
from spinlm.utils.manifest import MANIFEST  # noqa: F401 (re-exported)
from spinlm.utils.manifest import fsync, manifest_problem, member, read_manifest, write_manifest
from spinlm.utils.statefile import LEGACY_SUFFIX, SUFFIX, load_legacy_pt, load_state, save_state

log = logging.getLogger(__name__)

STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file so that a reader sees the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    fsync(tmp)
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


@contextlib.contextmanager
def _readable(file: Path) -> Iterator[None]:
    """A weights file safetensors cannot parse is a CheckpointError naming it."""
    try:
        yield
    except SafetensorError as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


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
        fsync(self.directory)
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
            save_state(state, tmp / f"{name}{SUFFIX}")
        (tmp / STATE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        write_manifest(tmp)

    @staticmethod
    def is_valid(path: Path) -> bool:
        """The manifest matches every file it lists (False too for a refused checkpoint)."""
        try:
            return manifest_problem(path) is None
        except CheckpointError:
            return False

    def step_dirs(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        dirs = [p for p in self.directory.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
        return sorted(dirs, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))

    def latest(self) -> Path | None:
        """The newest checkpoint whose manifest verifies; broken ones are reported and skipped, a
        refused one (see the module docstring) raises CheckpointError."""
        for path in reversed(self.step_dirs()):
            problem = manifest_problem(path)
            if problem is None:
                self._just_verified = path
                return path
            log.warning("checkpoint %s is incomplete or corrupt; trying the previous one (%s)", path, problem)
        return None

    def verify(self, path: Path, names: list[str] | None = None) -> None:
        """CheckpointError unless every file the manifest lists (or each of `names`) matches it
        (latest()'s answer: already done)."""
        verified, self._just_verified = path == self._just_verified, None
        problem = None if verified else manifest_problem(path, names)
        if problem is not None:
            raise CheckpointError(f"checkpoint {path} is incomplete or corrupt ({problem})")

    def load(
        self, path: Path, modules: dict[str, nn.Module], skip: tuple[str, ...] = (),
    ) -> tuple[dict[str, Any], dict]:
        """Load weights into `modules`; return (other states but those named in `skip`, trainer meta).
        Reads only files the manifest lists, and runs no code from them."""
        self.verify(path)
        for name, module in modules.items():
            file = member(path, f"{name}.safetensors")
            with _readable(file):
                load_model(module, str(file))
        states = {}
        for name in read_manifest(path):
            if name.endswith(SUFFIX):
                if name[: -len(SUFFIX)] not in skip:
                    states[name[: -len(SUFFIX)]] = load_state(path / name)
            elif name.endswith(LEGACY_SUFFIX) and name[: -len(LEGACY_SUFFIX)] not in skip:
                states[name[: -len(LEGACY_SUFFIX)]] = load_legacy_pt(path / name)
        meta = json.loads(member(path, STATE).read_text(encoding="utf-8"))
        return states, meta

    @staticmethod
    def weights(path: Path, name: str) -> dict[str, Tensor]:
        """The tensors of `{name}.safetensors` in a checkpoint (a tied weight appears under one name)."""
        file = member(path, f"{name}.safetensors")
        with _readable(file):
            return load_file(str(file))

    def _metric(self, path: Path) -> float | None:
        try:
            value = json.loads((path / STATE).read_text(encoding="utf-8")).get(self.monitor)
        except (OSError, ValueError):
            return None
        if value is None:
            return None
        value = float(value)
        return value if math.isfinite(value) else None  # a NaN/inf metric (diverged run) is never "best"

    def best(self) -> Path | None:
        """The checkpoint with the best `monitor` value (the oldest of equals), or None when none has one."""
        scored = [(m, p) for p in self.step_dirs() if (m := self._metric(p)) is not None]
        if not scored:
            return None
        return (min if self.mode == "min" else max)(scored, key=lambda mp: mp[0])[1]

    def _prune(self) -> None:
        """Keep the newest `keep_last` (-1: all; 0: the newest only, for resuming) plus the best."""
        for stale in self.directory.glob(".tmp_step_*"):  # left by a crash mid-save
            shutil.rmtree(stale, ignore_errors=True)
        dirs = self.step_dirs()
        if self.keep_last < 0:
            return
        keep = set(dirs[-self.keep_last:]) if self.keep_last > 0 else set(dirs[-1:])
        best = self.best()
        if best is not None:
            keep.add(best)
        for p in dirs:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)
