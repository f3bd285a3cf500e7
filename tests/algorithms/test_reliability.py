"""NaN/inf guards, out-of-memory messages and SIGTERM/SIGINT stops, on the tiny model in-process."""

import logging
import os
import shutil
import signal
import time

import pytest
import torch

from spinlm.algorithms import spin as spin_module
from spinlm.algorithms.spin import SPINTrainer
from spinlm.errors import TrainingError
from spinlm.model.generation import DecoderBackend
from spinlm.train import build_trainer
from spinlm.utils.guards import oom_guard

from test_spin import params_vector, read_metrics, cfg_factory  # noqa: F401 (fixture)


def _poison_loss_at(monkeypatch, step):
    real = spin_module.spin_loss

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        if trainer_step[0] == step - 1:
            out.losses[0] = float("nan")
        return out

    trainer_step = [0]
    monkeypatch.setattr(spin_module, "spin_loss", poisoned)
    return trainer_step


def test_nan_loss_stops_naming_the_step_before_saving(cfg_factory, monkeypatch):
    trainer = build_trainer(cfg_factory())
    counter = _poison_loss_at(monkeypatch, 3)
    real_step = SPINTrainer.train_single_step
    monkeypatch.setattr(SPINTrainer, "train_single_step", lambda self, b: (counter.__setitem__(0, self.step), real_step(self, b))[1])
    with pytest.raises(TrainingError, match=r"step 3: the loss is nan; stopped before the optimizer step"):
        trainer.fit()
    assert trainer.step == 2
    ckpts = sorted(p.name for p in (trainer.logger.run_dir / "checkpoints").iterdir())
    assert ckpts == ["step_000002"]  # step 2's checkpoint; nothing of step 3
    assert all(torch.isfinite(p).all() for p in trainer.policy.parameters())


def test_nan_loss_skipped_when_configured(cfg_factory, monkeypatch, caplog):
    trainer = build_trainer(cfg_factory("trainer.spin.skip_non_finite_steps=true"))
    counter = _poison_loss_at(monkeypatch, 3)
    real_step = SPINTrainer.train_single_step
    seen = {}

    def step(self, batch):
        counter[0] = self.step
        before = params_vector(self.policy)
        out = real_step(self, batch)
        seen[self.step + 1] = torch.equal(before, params_vector(self.policy))
        return out

    monkeypatch.setattr(SPINTrainer, "train_single_step", step)
    with caplog.at_level(logging.WARNING):
        trainer.fit()
    assert trainer.step == trainer.max_steps
    assert seen[3] and not seen[2] and not seen[4]  # only step 3 left the weights unchanged
    assert "step 3: the loss is nan; update skipped" in caplog.text
    rows = {r["step"]: r for r in read_metrics(trainer.logger.run_dir) if "train/loss" in r}
    assert rows[3]["train/skipped_non_finite"] == 1 and "train/skipped_non_finite" not in rows[2]


def test_inf_gradient_names_the_first_bad_parameter(cfg_factory, monkeypatch):
    trainer = build_trainer(cfg_factory())
    first_name, first = next(iter(trainer.policy.named_parameters()))
    first.register_hook(lambda g: torch.full_like(g, float("inf")))
    with pytest.raises(TrainingError, match=rf"step 1: the gradient norm is inf \(first non-finite: {first_name}\)"):
        trainer.fit()
    assert not (trainer.logger.run_dir / "checkpoints").exists()


def test_out_of_memory_names_sizes_and_keys():
    with pytest.raises(TrainingError) as err:
        with oom_guard("the train step", {"micro batch": 8, "seq len": 4096}, ("model.micro_batch_size",)):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert str(err.value) == "out of memory during the train step (micro batch 8, seq len 4096); lower model.micro_batch_size"
    with pytest.raises(ValueError):  # other errors pass through untouched
        with oom_guard("x", {}, ()):
            raise ValueError("unrelated")


def test_out_of_memory_in_generation_is_reported(cfg_factory, monkeypatch):
    def oom(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1 bytes")

    monkeypatch.setattr(DecoderBackend, "generate", oom)
    trainer = build_trainer(cfg_factory())
    with pytest.raises(TrainingError, match=r"out of memory during generation / reference log-probs \(rollout batch 8, "
                                            r"log-prob batch 4, max prompt len \d+, max new tokens 24\); lower "
                                            r"model.spin.rollout_micro_batch_size"):
        trainer.fit()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_saves_and_resumes_exactly(cfg_factory, monkeypatch, caplog, sig):
    full = build_trainer(cfg_factory(run_name="full"))
    full.fit()

    cfg = cfg_factory(run_name=f"stopped_{sig.name}")
    trainer = build_trainer(cfg)
    real_step = SPINTrainer.train_single_step

    def step(self, batch):
        if self.step == 2:  # mid step 3 (save_interval=2: step 3 is not a regular save)
            os.kill(os.getpid(), sig)
        return real_step(self, batch)

    monkeypatch.setattr(SPINTrainer, "train_single_step", step)
    with caplog.at_level(logging.WARNING):
        trainer.fit()
    assert trainer.step == 3
    assert f"{sig.name} at step 3: saved; run the same command again to resume" in caplog.text
    assert (trainer.logger.run_dir / "checkpoints" / "step_000003").is_dir()
    assert not (trainer.logger.run_dir / "final").exists()
    assert signal.getsignal(sig) is not trainer.stop_signals._handle  # handlers restored

    monkeypatch.setattr(SPINTrainer, "train_single_step", real_step)
    resumed = build_trainer(cfg)
    assert resumed.step == 3
    resumed.fit()
    assert torch.equal(params_vector(resumed.policy), params_vector(full.policy))
    steps = [r["step"] for r in read_metrics(resumed.logger.run_dir) if "train/loss" in r]
    assert steps == list(range(1, 9))


def test_signal_during_generation_abandons_it_and_saves(cfg_factory, monkeypatch, caplog):
    trainer = build_trainer(cfg_factory())
    real = DecoderBackend.generate
    calls = []

    def generate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second iteration's generation
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(DecoderBackend, "generate", generate)
    with caplog.at_level(logging.WARNING):
        trainer.fit()
    assert trainer.step == 4
    assert "abandoning the generation in progress" in caplog.text
    assert "SIGTERM at step 4: saved" in caplog.text
    assert not (trainer.logger.run_dir / "rollouts" / "iter_1.jsonl").exists()


def test_max_time_abandons_a_long_generation_once_a_step_is_trained(cfg_factory, monkeypatch, caplog):
    """The deadline (SIGALRM) fires inside the second generation, however fast the machine is: the test
    sends it there itself, with a max_time far beyond the run, so no timing decides the outcome."""
    real = DecoderBackend.generate
    finished = []

    def generate(*args, **kwargs):
        out = real(*args, **kwargs)
        if finished:  # every generation after the first one is very slow, and max_time runs out in it
            os.kill(os.getpid(), signal.SIGALRM)
            time.sleep(60)
        finished.append(1)
        return out

    monkeypatch.setattr(DecoderBackend, "generate", generate)
    cfg = cfg_factory("model.spin.regenerate_each_epoch=true", "trainer.max_time=00:01:00:00")
    trainer = build_trainer(cfg)
    with caplog.at_level(logging.WARNING):
        trainer.fit()
    assert len(finished) == 1  # the slow generation never returned: it was abandoned
    assert "max_time reached: abandoning the generation in progress" in caplog.text
    assert trainer.step == 2  # the second generation is the third epoch's (2 steps per epoch)
    assert f"max_time at step {trainer.step}: saved" in caplog.text
    assert (trainer.logger.run_dir / "checkpoints" / f"step_{trainer.step:06d}").is_dir()
    assert signal.getsignal(signal.SIGALRM) is not trainer.stop_signals._handle_deadline


@pytest.mark.parametrize("damage", ["truncate weights", "drop manifest", "corrupt rollouts"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(cfg_factory, caplog, damage):
    # corrupt rollouts: generating at every epoch keeps a frozen reference copy, which makes them again
    regenerate = "true" if damage == "corrupt rollouts" else "false"
    cfg = cfg_factory("exp_manager.checkpoint_callback_params.save_top_k=-1", f"model.spin.regenerate_each_epoch={regenerate}")
    first = build_trainer(cfg)
    first.fit()
    expected = params_vector(first.policy)
    checkpoints = first.logger.run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [f"step_{s:06d}" for s in (2, 4, 6, 8)]
    newest = checkpoints / "step_000008"
    if damage == "truncate weights":
        weights = newest / "policy.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        (newest / "manifest.json").unlink()
    if damage == "corrupt rollouts":  # the generations step 6 would reuse; they are made again, identically
        (first.logger.run_dir / "rollouts" / "iter_1_epoch_1.jsonl").write_text('{"index": 0, "generated_ids": [1, 2\n')
    with caplog.at_level(logging.WARNING):
        resumed = build_trainer(cfg)
        assert resumed.step == 6
        resumed.fit()
    assert "step_000008 is incomplete or corrupt; trying the previous one" in caplog.text
    if damage == "corrupt rollouts":
        assert "iter_1_epoch_1.jsonl is unreadable" in caplog.text
    assert torch.equal(params_vector(resumed.policy), expected)


def test_lost_rollouts_inside_an_iteration_are_refused_without_a_reference_copy(cfg_factory):
    """Full fine-tuning keeps no reference copy (model/reference.py), so a resume inside an iteration whose
    generations are lost cannot make them again: a one-line error naming the file; resuming from the
    iteration's start makes them again and ends where the run did."""
    cfg = cfg_factory("exp_manager.checkpoint_callback_params.save_top_k=-1")
    first = build_trainer(cfg)
    first.fit()
    checkpoints, rollouts = first.logger.run_dir / "checkpoints", first.logger.run_dir / "rollouts" / "iter_1.jsonl"
    shutil.rmtree(checkpoints / "step_000008")
    rollouts.unlink()
    resumed = build_trainer(cfg)
    assert resumed.step == 6
    with pytest.raises(TrainingError, match=f"making {rollouts} .* at step 6, inside iteration 1, needs the "
                                            "reference policy, .*resume from the checkpoint at the iteration's start"):
        resumed.fit()
    shutil.rmtree(checkpoints / "step_000006")
    again = build_trainer(cfg)
    assert again.step == 4
    again.fit()
    assert torch.equal(params_vector(again.policy), params_vector(first.policy))


def test_resume_with_a_different_batch_layout_is_refused(cfg_factory):
    from spinlm.errors import CheckpointError

    build_trainer(cfg_factory("trainer.spin.max_steps=2", "model.optim.sched.warmup_steps=0")).fit()
    with pytest.raises(CheckpointError, match=r"model.global_batch_size was 4, now 8; .*steps per epoch was 2, now 1"):
        build_trainer(cfg_factory("model.global_batch_size=8", "trainer.spin.limit_train_batches=1",
                                  "model.optim.sched.warmup_steps=0"))
