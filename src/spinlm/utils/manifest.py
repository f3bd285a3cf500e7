"""A checkpoint directory's `manifest.json`: each file's size and SHA-256, written last.

The manifest proves a checkpoint complete (a crash mid-write leaves none, or one that does not
match), not where it came from: it lives beside the files it lists. So reading it also refuses
(CheckpointError) what no checkpoint spinlm writes contains: a symbolic link (the directory, the
manifest or a listed file) and an entry that is not a plain file name of the directory
(`../x`, `/etc/x`, `a/b`). Only files the manifest lists are ever read.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from spinlm.errors import CheckpointError

MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path, names: list[str] | None = None) -> None:
    """fsync the files (`names`, default: every file of `directory`), then write `manifest.json`
    (name -> size, SHA-256) last, replacing any previous one in one rename."""
    if names is None:
        names = [p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST]
    files = [directory / name for name in sorted(names)]
    for p in files:
        fsync(p)
    manifest = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    fsync(tmp)
    os.replace(tmp, directory / MANIFEST)
    fsync(directory)


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest's entries. CheckpointError (refused) when the checkpoint directory or the manifest
    is a symbolic link, or an entry is not a plain file name of the directory; OSError / ValueError
    when it is missing or garbled (incomplete: a crash mid-write)."""
    if path.is_symlink():
        raise CheckpointError(f"{path}: refused: a checkpoint directory must not be a symbolic link")
    manifest = json.loads(_regular_file(path / MANIFEST).read_text(encoding="utf-8"))
    if not isinstance(manifest, dict):
        raise ValueError("not a JSON object")
    for name in manifest:
        if not _plain_name(name):
            raise CheckpointError(f"{path / MANIFEST}: refused: entry {name!r} is not a file of the checkpoint")
    return manifest


def member(path: Path, name: str) -> Path:
    """`path/name`, a regular file the manifest lists; CheckpointError otherwise."""
    if name not in read_manifest(path):
        raise CheckpointError(f"{path / name}: not listed in the checkpoint's {MANIFEST}")
    return _regular_file(path / name)


def _plain_name(name: str) -> bool:
    """A file name of the directory itself: no separator, not '.', '..', empty or absolute."""
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def _regular_file(p: Path) -> Path:
    """`p` if it is a regular file (not followed if a link); CheckpointError for a link or other kind."""
    mode = os.lstat(p).st_mode  # FileNotFoundError: incomplete
    if stat.S_ISLNK(mode):
        raise CheckpointError(f"{p}: refused: a symbolic link (a checkpoint holds only its own regular files)")
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{p}: refused: not a regular file")
    return p


def manifest_problem(path: Path, names: Iterable[str] | None = None) -> str | None:
    """Why the checkpoint is incomplete or corrupt (None: every listed file, or each of `names`,
    matches the manifest); CheckpointError when it is refused (see the module docstring)."""
    try:
        manifest = read_manifest(path)
    except (OSError, ValueError, TypeError) as e:
        return f"{MANIFEST}: {e}"
    for name in names or manifest:
        try:
            entry = manifest[name]
            file = _regular_file(path / name)
            if file.stat().st_size != entry["bytes"] or _sha256(file) != entry["sha256"]:
                return f"{name} does not match the manifest"
        except KeyError:
            return f"{name} is not listed in it"
        except (OSError, TypeError) as e:
            return f"{name}: {e}"
    return None
