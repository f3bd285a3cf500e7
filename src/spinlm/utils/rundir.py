"""A run directory as an input: what spinlm follows and what it reads from one it did not write.

Run directories travel (resuming on another cluster, evaluating someone's checkpoint), so their
contents are treated as untrusted:
- no symbolic link inside a run directory may lead outside it (`refuse_links_out`): spinlm writes,
  replaces and deletes files there (checkpoints, rollouts, final/, reports), so a link such as
  `checkpoints -> /elsewhere` or `report.md -> ~/.bashrc` would make it write elsewhere. Links that
  stay inside are fine, and `exp_manager.explicit_log_dir` may itself be a link (to keep a run on
  another disk, point explicit_log_dir there rather than linking its parts). The folders the
  experiment trackers manage (`wandb/`, `mlruns/`) are checked as entries but not entered: W&B
  links its debug logs to ~/.cache, and spinlm writes nothing inside them itself;
- the run's `config.yaml` is read as plain YAML data (`read_run_config`): no interpolation or
  resolver runs (spinlm writes it resolved), so a foreign `${oc.env:SECRET}` stays a string.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from spinlm.errors import ConfigError

RUN_CONFIG = "config.yaml"  # the composed, resolved config of the run, written at its start
TRACKER_DIRS = ("wandb", "mlruns")  # written by W&B / MLflow themselves (utils/trackers.py), with links of their own


def refuse_links_out(run_dir: str | Path, what: str = "exp_manager.explicit_log_dir") -> None:
    """ConfigError naming the first symbolic link in `run_dir` whose target lies outside it."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    root = run_dir.resolve()
    for folder, dirs, files in os.walk(run_dir):  # links to folders are listed, not entered
        entries = dirs + files
        if Path(folder) == run_dir:
            dirs[:] = [d for d in dirs if d not in TRACKER_DIRS]
        for name in entries:
            path = Path(folder, name)
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                raise ConfigError(
                    f"{what}: {path} is a symbolic link to {os.readlink(path)}, outside the run directory {run_dir}; "
                    "spinlm writes and deletes files there, so it follows no link out of a run directory "
                    "(to keep a run on another disk, point the run directory itself there)"
                )


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The run's config.yaml as plain data (yaml.safe_load: no Python objects, no resolvers)."""
    path = Path(run_dir) / RUN_CONFIG
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: unreadable run config ({str(e).splitlines()[0] if str(e) else e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a spinlm run config (expected a mapping)")
    return data


def lookup(config: dict[str, Any], key: str, default: Any = None) -> Any:
    """`config["a"]["b"]` for key "a.b"; `default` when a part is missing."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node
