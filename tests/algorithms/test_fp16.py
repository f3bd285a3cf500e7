"""trainer.precision=16-mixed: fp16 autocast with a loss scaler (torch.amp.GradScaler), so small
gradients do not underflow; an overflow skips the update and lowers the scale instead of stopping
the run; the scaler's state is checkpointed and a resume is exact."""

import torch
from conftest import sigterm_at_step
from test_spin import cfg_factory, params_vector, read_metrics  # noqa: F401 (fixture)

from spinlm.train import build_trainer

FP16 = ("trainer.precision=16-mixed",)


def test_fp16_scales_the_loss_and_resumes_exactly(cfg_factory, monkeypatch):
    full = build_trainer(cfg_factory(*FP16, run_name="full"))
    assert full.scaler.is_enabled()
    start = params_vector(full.policy)
    full.fit()
    assert not torch.equal(params_vector(full.policy), start)  # it trained
    rows = [r for r in read_metrics(full.logger.run_dir) if "train/loss_scale" in r]
    assert len(rows) == 8 and all(r["train/loss_scale"] >= 1 for r in rows)

    cfg = cfg_factory(*FP16, run_name="stopped")
    trainer = build_trainer(cfg)
    sigterm_at_step(trainer, 2, monkeypatch)
    saved = trainer.logger.run_dir / "checkpoints" / "step_000003"
    states, _ = trainer.checkpointer.load(saved, {})
    assert states["grad_scaler"]["scale"] == trainer.scaler.get_scale()

    resumed = build_trainer(cfg)
    assert resumed.scaler.get_scale() == trainer.scaler.get_scale()
    resumed.fit()
    assert torch.equal(params_vector(resumed.policy), params_vector(full.policy))
    assert resumed.scaler.state_dict() == full.scaler.state_dict()


def test_fp16_overflow_skips_the_update_and_halves_the_scale(cfg_factory):
    trainer = build_trainer(cfg_factory(*FP16, "trainer.spin.max_steps=3", "model.optim.sched.warmup_steps=0"))
    real_unscale = trainer.scaler.unscale_
    calls = []

    def overflow_once(optimizer):  # as if the scaled fp16 gradients overflowed at step 2
        calls.append(1)
        if len(calls) == 2:
            next(p for p in trainer.policy.parameters() if p.grad is not None).grad.fill_(float("inf"))
        return real_unscale(optimizer)

    trainer.scaler.unscale_ = overflow_once
    trainer.fit()  # no TrainingError: an fp16 overflow is expected now and then
    rows = [r for r in read_metrics(trainer.logger.run_dir) if "train/step_time" in r]
    assert [r.get("train/skipped_overflow") for r in rows] == [None, 1, None]
    scales = [r.get("train/loss_scale") for r in rows]
    assert scales[2] == scales[0] / 2  # backed off once (growth only after 2000 good steps)
    assert all(torch.isfinite(p).all() for p in trainer.policy.parameters())
