"""Inputs an attacker controls, for the tests that show spinlm never runs them: a pickle whose loading
writes a marker file, a checkpoint manifest rewritten to match planted files, a model directory that
asks for its own Python code."""

import hashlib
import json
import shutil

import torch

from spinlm.utils.manifest import MANIFEST


class RunsCode:
    """Unpickling this object runs code: it writes `marker` (what an attacker's payload would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def poisoned_pt(path, marker):
    """A torch.save file (as the previous checkpoint format wrote) whose loading would write `marker`."""
    torch.save({"state": {}, "param_groups": [], "payload": RunsCode(marker)}, path)
    return path


def rewrite_manifest(path, **entries):
    """What an attacker with write access does: make the manifest match the files again."""
    manifest = json.loads((path / MANIFEST).read_text())
    for name, file in entries.items():
        data = file.read_bytes()
        manifest[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / MANIFEST).write_text(json.dumps(manifest))


def swap_in(path, old, new_name, payload):
    """Replace state file `old` by the file `payload`, named `new_name`; the manifest rewritten to match."""
    manifest = json.loads((path / MANIFEST).read_text())
    del manifest[old]
    (path / MANIFEST).write_text(json.dumps(manifest))
    (path / old).unlink()
    shutil.copyfile(payload, path / new_name)
    rewrite_manifest(path, **{new_name: path / new_name})


def remote_code_dir(tiny_dir, tmp_path, file="config.json", model_type=None):
    """A copy of the tiny model whose `file` asks for its own classes (auto_map); importing them would
    write a marker file."""
    out = tmp_path / "remote_code_model"
    shutil.copytree(tiny_dir, out)
    marker = tmp_path / "marker"
    (out / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    config = json.loads((out / file).read_text())
    auto = {"AutoTokenizer": ["evil.EvilTokenizer", None]} if file == "tokenizer_config.json" else {
        "AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    config["auto_map"] = auto
    if model_type:
        config["model_type"] = model_type
    (out / file).write_text(json.dumps(config))
    return out, marker
