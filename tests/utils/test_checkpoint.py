"""Checkpointer: atomic step directories verified by a manifest, retention, atomic_write_text."""

import hashlib
import json
import logging
import pickle
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file, save_model
from torch import nn

from spinlm.errors import CheckpointError
from spinlm.utils import rng
from spinlm.utils.checkpoint import MANIFEST, Checkpointer, atomic_write_text
from spinlm.utils.manifest import write_manifest
from untrusted import RunsCode, poisoned_pt, rewrite_manifest, swap_in


class Tied(nn.Module):
    """Embedding and output projection share one weight, as in small LMs."""

    def __init__(self, vocab=11, dim=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.body = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight


def _seq(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))


def _tied(seed):
    torch.manual_seed(seed)
    return Tied()


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _save(ck, step, meta=None, seed=0):
    return ck.save(step, {"policy": _seq(seed)}, {"extra": {"step": step}}, meta or {"step": step})


def test_round_trip_modules_states_meta(tmp_path):
    policy, tied = _seq(1), _tied(2)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    policy(torch.randn(4, 3)).sum().backward()
    opt.step()  # non-empty optimizer state (exp_avg, exp_avg_sq, step)
    meta = {"step": 7, "val_loss": 1.25, "iteration": 1, "nested": {"a": [1, 2]}}
    ck = Checkpointer(tmp_path / "ckpt")
    path = ck.save(7, {"policy": policy, "reference": tied}, {"optimizer": opt.state_dict(), "rng": {"x": 3}}, meta)
    assert path == tmp_path / "ckpt" / "step_000007"
    assert (path / MANIFEST).is_file()

    policy2, tied2 = _seq(10), _tied(20)
    assert not _same(policy, policy2) and not _same(tied, tied2)  # the load must do the work
    states, meta2 = ck.load(path, {"policy": policy2, "reference": tied2})
    assert _same(policy, policy2)
    assert _same(tied, tied2)
    assert tied2.head.weight.data_ptr() == tied2.emb.weight.data_ptr()  # still tied after loading
    assert meta2 == meta
    assert set(states) == {"optimizer", "rng"}
    assert states["rng"] == {"x": 3}
    assert ck.load(path, {}, skip=("optimizer",))[0] == {"rng": {"x": 3}}  # what ranks but 0 read on resume

    opt2 = torch.optim.AdamW(policy2.parameters(), lr=1e-3)
    opt2.load_state_dict(states["optimizer"])
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k in s1["state"]:
        for name, v in s1["state"][k].items():
            assert torch.equal(v, s2["state"][k][name])


def test_latest_returns_newest(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=10)
    assert ck.latest() is None
    for step in (3, 12, 5):  # saved out of order on purpose: "newest" means highest step
        _save(ck, step)
    assert ck.latest() == tmp_path / "step_000012"


def test_latest_on_missing_directory(tmp_path):
    assert Checkpointer(tmp_path / "nope").latest() is None


def test_save_same_step_twice_replaces(tmp_path):
    ck = Checkpointer(tmp_path)
    _save(ck, 4, meta={"step": 4, "v": 1})
    p = _save(ck, 4, meta={"step": 4, "v": 2})
    assert ck.load(p, {"policy": _seq(0)})[1]["v"] == 2
    assert [d.name for d in tmp_path.iterdir()] == ["step_000004"]


def _flip_byte(path, offset=-5):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("victim", ["policy.safetensors", "extra.state.safetensors", "trainer_state.json"])
def test_corrupt_file_is_skipped_with_warning(tmp_path, caplog, victim):
    ck = Checkpointer(tmp_path, keep_last=5)
    _save(ck, 1)
    good = _save(ck, 2)
    bad = _save(ck, 3)
    assert ck.latest() == bad
    size = (bad / victim).stat().st_size
    _flip_byte(bad / victim)
    assert (bad / victim).stat().st_size == size  # same size: only the hash can tell
    with caplog.at_level(logging.WARNING, logger="spinlm.utils.checkpoint"):
        assert ck.latest() == good
    assert any("step_000003" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert not ck.is_valid(bad)
    assert ck.is_valid(good)
    with pytest.raises(CheckpointError, match="step_000003"):
        ck.load(bad, {"policy": _seq(0)})


def test_truncated_file_is_invalid(tmp_path):
    ck = Checkpointer(tmp_path)
    p = _save(ck, 1)
    f = p / "policy.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    assert not ck.is_valid(p)


def test_crash_mid_write_is_skipped(tmp_path, caplog):
    ck = Checkpointer(tmp_path, keep_last=5)
    good = _save(ck, 2)
    # a crash while writing step 4: its temporary directory is left behind ...
    tmp = tmp_path / ".tmp_step_000004"
    tmp.mkdir()
    (tmp / "policy.safetensors").write_bytes(b"partial")
    # ... and a step directory whose manifest was never written
    partial = _save(ck, 3)
    (partial / MANIFEST).unlink()
    with caplog.at_level(logging.WARNING, logger="spinlm.utils.checkpoint"):
        assert ck.latest() == good
    assert any("step_000003" in r.getMessage() for r in caplog.records)
    with pytest.raises(CheckpointError):
        ck.load(partial, {"policy": _seq(0)})
    # a garbled manifest is treated the same way
    (partial / MANIFEST).write_text("{not json", encoding="utf-8")
    assert ck.latest() == good


def test_all_broken_returns_none(tmp_path):
    ck = Checkpointer(tmp_path)
    p = _save(ck, 1)
    (p / MANIFEST).unlink()
    assert ck.latest() is None


def test_manifest_lists_every_file_with_hash(tmp_path):
    p = _save(Checkpointer(tmp_path), 1)
    manifest = json.loads((p / MANIFEST).read_text())
    files = {f.name for f in p.iterdir() if f.name != MANIFEST}
    assert set(manifest) == files == {"policy.safetensors", "extra.state.safetensors", "trainer_state.json"}
    for name, entry in manifest.items():
        data = (p / name).read_bytes()
        assert entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()


def _steps(directory):
    return sorted(int(p.name.split("_")[1]) for p in directory.iterdir() if p.name.startswith("step_"))


def test_retention_keeps_newest_without_metric(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=2)
    for step in range(1, 6):
        _save(ck, step)
    assert _steps(tmp_path) == [4, 5]


@pytest.mark.parametrize(
    "mode,best",
    [("min", 2), ("max", 3)],
)
def test_retention_keeps_best_by_monitor(tmp_path, mode, best):
    losses = {1: 0.9, 2: 0.1, 3: 2.0, 4: 0.5, 5: 0.7, 6: 0.6}
    ck = Checkpointer(tmp_path, keep_last=2, monitor="val_loss", mode=mode)
    for step, v in losses.items():
        _save(ck, step, meta={"step": step, "val_loss": v})
    assert _steps(tmp_path) == sorted({5, 6, best})


def test_retention_best_is_among_newest(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=2, mode="min")
    for step, v in {1: 0.9, 2: 0.8, 3: 0.1}.items():
        _save(ck, step, meta={"val_loss": v})
    assert _steps(tmp_path) == [2, 3]


def test_retention_ignores_steps_without_metric(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=1, mode="min")
    _save(ck, 1, meta={"val_loss": 0.5})
    _save(ck, 2, meta={"step": 2})  # no validation at this step
    _save(ck, 3, meta={"val_loss": None})
    _save(ck, 4, meta={"val_loss": 0.7})
    assert _steps(tmp_path) == [1, 4]


def test_retention_other_monitor(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=1, monitor="reward", mode="max")
    for step, r in {1: 3.0, 2: 5.0, 3: 1.0}.items():
        _save(ck, step, meta={"reward": r, "val_loss": -r})
    assert _steps(tmp_path) == [2, 3]


def test_retention_keep_last_zero_keeps_latest(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=0)
    for step in range(1, 4):
        _save(ck, step)
    assert _steps(tmp_path) == [3]


def test_retention_nan_metric_is_never_best(tmp_path):
    """A diverged run (val_loss NaN) must not pin its checkpoint as 'best' forever."""
    ck = Checkpointer(tmp_path, keep_last=1, mode="min")
    _save(ck, 1, meta={"val_loss": float("nan")})
    _save(ck, 2, meta={"val_loss": 0.9})
    _save(ck, 3, meta={"val_loss": 0.5})
    _save(ck, 4, meta={"val_loss": 0.7})
    assert _steps(tmp_path) == [3, 4]


def test_atomic_write_text(tmp_path):
    target = tmp_path / "config.yaml"
    atomic_write_text(target, "a: 1\n")
    assert target.read_text(encoding="utf-8") == "a: 1\n"
    atomic_write_text(target, "a: 2\nb: é\n")
    assert target.read_text(encoding="utf-8") == "a: 2\nb: é\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]  # no temp file left


def test_resume_hashes_each_file_once(tmp_path, monkeypatch):
    """latest() verifies the manifest; the load() that follows must not read every byte again."""
    from spinlm.utils import manifest as manifest_module

    ckpt = Checkpointer(tmp_path / "ckpts")
    model = nn.Linear(4, 4)
    ckpt.save(1, {"policy": model}, {"opt": {"a": 1}}, {"step": 1})
    hashed = []
    real = manifest_module._sha256
    monkeypatch.setattr(manifest_module, "_sha256", lambda p: (hashed.append(p.name), real(p))[1])
    path = ckpt.latest()
    ckpt.load(path, {"policy": nn.Linear(4, 4)})
    assert sorted(hashed) == sorted(set(hashed))
    assert len(hashed) == len(list(path.iterdir())) - 1  # every file but the manifest, once


def test_save_top_k_minus_one_keeps_all(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=-1)
    for step in range(1, 6):
        _save(ck, step)
    assert [p.name for p in ck.step_dirs()] == [f"step_{s:06d}" for s in range(1, 6)]


def test_non_finite_weights_are_never_written(tmp_path):
    ck = Checkpointer(tmp_path)
    _save(ck, 1)
    bad = _seq(0)
    with torch.no_grad():
        bad[2].bias[1] = float("nan")
    with pytest.raises(CheckpointError, match=r"refusing to save policy at step 2: parameter 2\.bias holds NaN"):
        ck.save(2, {"policy": bad}, {}, {"step": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["step_000001"]


def test_failed_save_removes_its_temp_dir(tmp_path, monkeypatch):
    from spinlm.utils import checkpoint

    ck = Checkpointer(tmp_path)
    _save(ck, 1)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_state", disk_full)
    with pytest.raises(OSError, match="No space left"):
        _save(ck, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["step_000001"]
    assert ck.latest() == tmp_path / "step_000001"


# ----- loading runs no code from the checkpoint, reads nothing outside it -------------------------------
def _states():
    policy = _seq(1)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    policy(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return policy, {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": [rng.capture()]}


@pytest.mark.parametrize("state", ["optimizer", "scheduler", "rng"])
@pytest.mark.parametrize("as_name", ["{}.pt", "{}.state.safetensors"])
def test_a_state_file_that_would_run_code_is_refused(tmp_path, state, as_name):
    """The previous format's `.pt` name (weights_only load) and the current name (safetensors parse)."""
    marker = tmp_path / "marker"
    policy, states = _states()
    ck = Checkpointer(tmp_path / "ckpt")
    path = ck.save(1, {"policy": policy}, states, {"step": 1})
    payload = poisoned_pt(tmp_path / "payload", marker)
    victim = as_name.format(state)
    swap_in(path, f"{state}.state.safetensors", victim, payload)
    assert ck.latest() == path  # the manifest matches: it cannot tell a planted file from a real one
    with pytest.raises(CheckpointError, match=re.escape(str(path / victim))):
        ck.load(path, {"policy": _seq(0)})
    assert not marker.exists()


def test_a_poisoned_weights_file_is_refused(tmp_path):
    marker = tmp_path / "marker"
    ck = Checkpointer(tmp_path / "ckpt")
    path = _save(ck, 1)
    (path / "policy.safetensors").write_bytes(pickle.dumps(RunsCode(marker)))
    rewrite_manifest(path, **{"policy.safetensors": path / "policy.safetensors"})
    with pytest.raises(CheckpointError, match="policy.safetensors: not a readable safetensors file"):
        ck.load(path, {"policy": _seq(0)})
    with pytest.raises(CheckpointError, match="policy.safetensors: not a readable safetensors file"):
        ck.weights(path, "policy")
    assert not marker.exists()


def test_files_the_manifest_does_not_list_are_never_read(tmp_path):
    marker = tmp_path / "marker"
    ck = Checkpointer(tmp_path / "ckpt")
    path = _save(ck, 1)
    poisoned_pt(path / "evil.pt", marker)
    states, _ = ck.load(path, {"policy": _seq(0)})
    assert set(states) == {"extra"} and not marker.exists()
    (path / "policy.safetensors").rename(path / "other.safetensors")
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["other.safetensors"] = manifest.pop("policy.safetensors")
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="policy.safetensors: not listed in the checkpoint's manifest.json"):
        ck.weights(path, "policy")


@pytest.mark.parametrize("entry", ["../outside.pt", "{abs}", "sub/x.pt", "..", ""])
def test_a_manifest_entry_outside_the_checkpoint_is_refused(tmp_path, entry):
    marker = tmp_path / "marker"
    (tmp_path / "ckpt").mkdir()
    outside = poisoned_pt(tmp_path / "ckpt" / "outside.pt", marker)  # "../outside.pt" from a step directory
    entry = entry.format(abs=outside)
    ck = Checkpointer(tmp_path / "ckpt")
    older = _save(ck, 1)
    path = _save(ck, 2)
    (path / "sub").mkdir()
    shutil.copyfile(outside, path / "sub" / "x.pt")
    rewrite_manifest(path, **{entry: outside})
    for call in (lambda: ck.latest(), lambda: ck.load(path, {"policy": _seq(0)}), lambda: ck.weights(path, "policy")):
        with pytest.raises(CheckpointError, match=re.escape(f"entry {entry!r} is not a file of the checkpoint")):
            call()
    assert not ck.is_valid(path) and ck.is_valid(older)
    assert not marker.exists()


def test_links_inside_a_checkpoint_are_refused(tmp_path):
    """A listed file, the manifest or the step directory itself as a symbolic link."""
    ck = Checkpointer(tmp_path / "ckpt", keep_last=10)
    good = _save(ck, 1)
    path = _save(ck, 2)
    elsewhere = tmp_path / "elsewhere.state.safetensors"
    shutil.move(path / "extra.state.safetensors", elsewhere)
    (path / "extra.state.safetensors").symlink_to(elsewhere)
    with pytest.raises(CheckpointError, match="extra.state.safetensors: refused: a symbolic link"):
        ck.load(path, {"policy": _seq(0)})
    with pytest.raises(CheckpointError, match="refused: a symbolic link"):
        ck.latest()

    shutil.rmtree(path)
    (tmp_path / "ckpt" / "step_000002").symlink_to(good)
    with pytest.raises(CheckpointError, match="step_000002: refused: a checkpoint directory must not be a symbolic"):
        ck.load(tmp_path / "ckpt" / "step_000002", {"policy": _seq(0)})

    (tmp_path / "ckpt" / "step_000002").unlink()
    shutil.move(good / MANIFEST, tmp_path / MANIFEST)
    (good / MANIFEST).symlink_to(tmp_path / MANIFEST)
    with pytest.raises(CheckpointError, match="manifest.json: refused: a symbolic link"):
        ck.load(good, {"policy": _seq(0)})


def test_previous_format_checkpoint_loads(tmp_path):
    """Checkpoints written before this format: `.pt` states (torch.save) of plain containers."""
    policy, states = _states()
    states["rng"] = [{"torch": torch.get_rng_state(), "cuda": None}]  # what they held then
    path = tmp_path / "ckpt" / "step_000003"
    path.mkdir(parents=True)
    ck = Checkpointer(tmp_path / "ckpt")
    save_model(policy, str(path / "policy.safetensors"))
    for name, state in states.items():
        torch.save(state, path / f"{name}.pt")
    (path / "trainer_state.json").write_text(json.dumps({"step": 3}))
    write_manifest(path)
    assert ck.latest() == path
    loaded, meta = ck.load(path, {"policy": (fresh := _seq(0))})
    assert meta == {"step": 3} and _same(policy, fresh)
    assert loaded["scheduler"] == states["scheduler"]
    assert torch.equal(loaded["rng"][0]["torch"], states["rng"][0]["torch"])
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], states["optimizer"]["state"][0]["exp_avg"])


def test_convert_checkpoint_runs_pickle_only_when_told_the_files_are_trusted(tmp_path, capsys):
    """A `.pt` that weights_only refuses (numpy inside) converts, from a trusted copy, to a safe state file."""
    from spinlm import cli

    path = tmp_path / "ckpt" / "step_000001"
    path.mkdir(parents=True)
    torch.save({"numpy": np.arange(3, dtype=np.uint32), "n": np.float64(0.5)}, path / "rng.pt")
    save_file({"w": torch.ones(2)}, str(path / "policy.safetensors"))
    (path / "trainer_state.json").write_text("{}")
    write_manifest(path)
    ck = Checkpointer(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="convert-checkpoint"):
        ck.load(path, {})
    assert cli.main(["convert-checkpoint", str(path)]) == 2
    assert "--trusted" in capsys.readouterr().err and (path / "rng.pt").exists()
    assert cli.main(["convert-checkpoint", str(path), "--trusted"]) == 0
    states, _ = ck.load(path, {})
    assert states["rng"]["numpy"].tolist() == [0, 1, 2] and states["rng"]["numpy"].dtype == torch.uint32
    assert states["rng"]["n"] == 0.5
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json", "policy.safetensors", "rng.state.safetensors", "trainer_state.json"]
    assert ck.is_valid(path)
