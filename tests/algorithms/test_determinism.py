"""Same command, same numbers: results depend on the config, the data and the seed, never on the
machine's load. The CPU linear kernel (which changes float rounding) is a fixed rule, decided by
rank 0 and recorded in checkpoints; a resume reuses the recorded kernel even where the rule now
says otherwise."""

import json
import logging

import pytest
import torch
from busy import busy_cores
from conftest import sigterm_at_step
from safetensors.torch import load_file
from spawn import run_ranks
from test_spin import cfg_factory, make_cfg  # noqa: F401 (fixture)

from spinlm.model import kernels
from spinlm.model.kernels import linear_kernel_in_use, onednn_available
from spinlm.train import build_trainer, choose_linear_kernel, run

TIMING = ("time", "timing/", "step_time")  # wall-clock values: the only numbers allowed to differ


def _results(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [{k: v for k, v in r.items() if not any(k.startswith(t) or k.endswith(t) for t in TIMING)} for r in rows]
    weights = load_file(str(run_dir / "final" / "model.safetensors"))
    rollouts = sorted(p.read_text() for p in (run_dir / "rollouts").glob("*.jsonl"))
    return rows, weights, rollouts


def _assert_identical(a, b):
    assert a[0] == b[0]  # every metric row, every value, bitwise (JSON floats round-trip exactly)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        assert torch.equal(a[1][name], b[1][name]), name
    assert a[2] == b[2]  # the generated answers and their reference log-probs


def test_two_runs_one_under_load_are_bitwise_equal(cfg_factory, tmp_path):
    """cpu_linear_kernel=auto used to time oneDNN against MKL in each process: under load the
    choice flipped between runs, and with it the rounding of every product."""
    run(cfg_factory("trainer.spin.max_iterations=1", run_name="idle"))
    with busy_cores():
        run(cfg_factory("trainer.spin.max_iterations=1", run_name="busy"))
    _assert_identical(_results(tmp_path / "idle"), _results(tmp_path / "busy"))


def _other_vendor():
    """A CPU vendor for which the rule picks the other kernel than on this machine."""
    return "GenuineIntel" if kernels.resolve_cpu_linear_kernel("auto") == "onednn" else "AuthenticAMD"


@pytest.mark.skipif(not onednn_available(), reason="needs oneDNN (two kernels to choose between)")
def test_resume_reuses_the_recorded_kernel(cfg_factory, monkeypatch, caplog):
    """Stopped at step 3, resumed where the rule now picks the other kernel: the resumed run keeps the
    checkpoint's kernel and ends bitwise where an uninterrupted run ends."""
    full = build_trainer(cfg_factory(run_name="full"))
    full.fit()
    kernel = linear_kernel_in_use(full.policy)

    cfg = cfg_factory(run_name="stopped")
    trainer = build_trainer(cfg)
    sigterm_at_step(trainer, 2, monkeypatch)
    assert trainer.step == 3
    meta = json.loads((trainer.logger.run_dir / "checkpoints" / "step_000003" / "trainer_state.json").read_text())
    assert meta["cpu_linear_kernel"] == kernel

    vendor = _other_vendor()
    monkeypatch.setattr(kernels, "cpu_vendor", lambda: vendor)
    assert kernels.resolve_cpu_linear_kernel("auto") != kernel  # the rule now says the other kernel
    with caplog.at_level(logging.INFO):
        resumed = build_trainer(cfg)
    assert f"CPU linear layers: {kernel} (recorded in the checkpoint being resumed)" in caplog.text
    resumed.fit()
    assert linear_kernel_in_use(resumed.policy) == kernel
    for (name, p), q in zip(resumed.policy.named_parameters(), full.policy.parameters()):
        assert torch.equal(p, q), name


def test_choose_linear_kernel_rule():
    rule = kernels.resolve_cpu_linear_kernel("auto")
    assert choose_linear_kernel("auto", None)[0] == rule
    assert choose_linear_kernel("default", None)[0] == "default"
    if onednn_available():
        other = "default" if rule == "onednn" else "onednn"
        assert choose_linear_kernel("auto", other) == (other, "recorded in the checkpoint being resumed")
        # an explicit kernel wins over the recorded one (the user asked), with a warning about rounding
        assert choose_linear_kernel(rule, other)[0] == rule


def _ranks_agree(rank, model_dir, files, run_dir, other_vendor):
    if rank == 1:  # rank 1's own rule would pick the other kernel: rank 0 decides for both
        kernels.cpu_vendor = lambda: other_vendor
    cfg = make_cfg(run_dir, model_dir, files, "model.micro_batch_size=1", "trainer.spin.max_steps=1",
                   "model.optim.sched.warmup_steps=0")
    trainer = build_trainer(cfg)
    with trainer.reference.active() as reference:
        return linear_kernel_in_use(trainer.policy), linear_kernel_in_use(reference)


@pytest.mark.skipif(not onednn_available(), reason="needs oneDNN (two kernels to choose between)")
def test_rank_zero_decides_the_kernel_for_every_rank(tmp_path, tiny_model_dir, chat_files):
    got = run_ranks(_ranks_agree, 2, tmp_path / "ranks", tiny_model_dir, chat_files, tmp_path / "run", _other_vendor())
    rule = kernels.resolve_cpu_linear_kernel("auto")
    assert got == [(rule, rule), (rule, rule)]
