"""The run length, the lr schedules (CosineAnnealing, Constant), their checks, and build_optimizer."""

import math

import pytest
import torch
from torch import nn

from spinlm.config import load_config
from spinlm.errors import ConfigError
from spinlm.schedule import LRSchedule, StepSchedule, cosine_annealing
from spinlm.train import build_optimizer


def _hand(step, max_steps, warmup, constant, min_ratio):
    """Written out independently: warmup (k+1)/(W+1), then min + (1-min) cos^2(pi/2 * progress), then min."""
    if warmup and step <= warmup:
        return (step + 1) / (warmup + 1)
    decay = max_steps - warmup - constant
    if step >= warmup + decay:
        return min_ratio
    p = (step - warmup) / decay
    return min_ratio + (1 - min_ratio) * math.cos(math.pi * p / 2) ** 2


MAX, WARM, CONST, MIN = 30, 4, 6, 0.1  # decay over steps 4..24, constant from step 24


def _curve(max_steps=MAX, warmup=WARM, constant=CONST, min_ratio=MIN, n=None):
    return [cosine_annealing(s, max_steps, warmup, constant, min_ratio) for s in range(n or max_steps)]


def test_matches_hand_formula_everywhere():
    got = _curve()
    assert got == pytest.approx([_hand(s, MAX, WARM, CONST, MIN) for s in range(MAX)], rel=1e-12)


def test_linear_warmup_reaches_peak_at_warmup_step():
    """NeMo's WarmupPolicy: (step + 1) / (warmup + 1), the peak exactly once, at step `warmup`."""
    got = _curve()
    assert got[:WARM + 1] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    diffs = [b - a for a, b in zip(got[:WARM + 1], got[1:WARM + 1])]
    assert diffs == pytest.approx([0.2] * WARM)  # linear
    assert got[WARM + 1] < 1.0  # decay follows the peak


def test_decays_monotonically_to_min_ratio():
    got = _curve()
    decay = got[WARM:MAX - CONST + 1]
    assert all(b < a for a, b in zip(decay, decay[1:]))  # strictly decreasing
    assert decay[-1] == pytest.approx(MIN)
    mid = WARM + (MAX - WARM - CONST) // 2  # half way: the cosine is at the mean of peak and min
    assert got[mid] == pytest.approx((1 + MIN) / 2)
    assert min(got) == pytest.approx(MIN)
    assert all(v >= MIN - 1e-12 for v in got)


def test_constant_for_final_constant_steps():
    got = _curve(n=MAX + 5)  # and after max_steps too
    assert got[MAX - CONST:] == pytest.approx([MIN] * (CONST + 5))
    assert got[MAX - CONST - 1] > MIN


def test_no_warmup_starts_at_peak():
    got = _curve(warmup=0)
    assert got[0] == pytest.approx(1.0)
    assert got == pytest.approx([_hand(s, MAX, 0, CONST, MIN) for s in range(MAX)])


def test_no_constant_phase_decays_over_the_rest():
    got = _curve(constant=0)
    assert got == pytest.approx([_hand(s, MAX, WARM, 0, MIN) for s in range(MAX)])
    assert got[-1] > MIN  # min is reached at step max_steps, one after the last step
    assert cosine_annealing(MAX, MAX, WARM, 0, MIN) == pytest.approx(MIN)


def test_constant_steps_longer_than_the_run():
    """The bare formula: no room to decay -> warmup to the peak, then straight to min_ratio.
    (LRSchedule refuses such a config: see test_schedule_that_would_sit_at_min_lr_is_refused.)"""
    got = _curve(max_steps=10, warmup=3, constant=1000, n=12)
    assert got[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert got[4:] == pytest.approx([MIN] * 8)
    # without warmup the whole run sits at min_ratio
    assert _curve(max_steps=10, warmup=0, constant=1000) == pytest.approx([MIN] * 10)
    # warmup longer than the run
    assert _curve(max_steps=3, warmup=5, constant=0) == pytest.approx([1 / 6, 2 / 6, 3 / 6])


def _cfg(*overrides):
    return load_config([
        "model.optim.lr=1e-3",
        "model.optim.weight_decay=0.05",
        "model.optim.betas=[0.8,0.95]",
        "model.optim.eps=1e-6",
        "model.optim.sched.warmup_steps=3",
        "model.optim.sched.constant_steps=2",
        "model.optim.sched.min_lr=1e-4",
        *overrides,
    ])


def test_build_optimizer_follows_config_and_schedule():
    cfg = _cfg()
    torch.manual_seed(0)
    policy = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    policy[0].bias.requires_grad_(False)  # frozen parameters are left out
    max_steps = 12
    opt, sched = build_optimizer(cfg, policy, max_steps=max_steps)
    assert type(opt) is torch.optim.AdamW
    (group,) = opt.param_groups
    assert group["initial_lr"] == pytest.approx(1e-3)
    assert tuple(group["betas"]) == (0.8, 0.95)
    assert group["weight_decay"] == pytest.approx(0.05)
    assert group["eps"] == pytest.approx(1e-6)
    assert len(group["params"]) == 3
    assert all(p is not policy[0].bias for p in group["params"])
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)

    lrs = []
    for _ in range(max_steps + 2):
        lrs.append(opt.param_groups[0]["lr"])  # the lr the optimizer step k uses
        opt.step()
        sched.step()
    expected = [1e-3 * _hand(k, max_steps, 3, 2, 0.1) for k in range(max_steps + 2)]
    assert lrs == pytest.approx(expected, rel=1e-9)
    assert lrs[3] == pytest.approx(1e-3)  # peak at step `warmup`
    assert lrs[-1] == pytest.approx(1e-4)  # min_lr at the end


def _lrs(cfg, max_steps):
    opt, sched = build_optimizer(cfg, nn.Linear(2, 2), max_steps=max_steps)
    lrs = []
    for _ in range(max_steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_build_optimizer_constant_schedule():
    assert _lrs(_cfg("model.optim.sched.name=Constant", "model.optim.sched.warmup_steps=0"), 5) == pytest.approx([1e-3] * 5)


def test_constant_schedule_honours_warmup():
    """A warmup the user set is not dropped because the schedule is Constant."""
    lrs = _lrs(_cfg("model.optim.sched.name=Constant"), 6)  # warmup_steps=3
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_defaults_fit_any_run_length():
    """The packaged schedule reaches the lr and decays over every run length, from 1 step up."""
    for max_steps in (1, 2, 7, 16, 100, 5000):
        cfg = load_config(["model.optim.lr=2e-5"])
        lrs = _lrs(cfg, max_steps)
        assert max(lrs) == pytest.approx(2e-5)
        if max_steps > 1:
            assert lrs[-1] < 2e-5  # it decays: never held at min_lr, never stuck below the peak
        assert lrs.count(pytest.approx(9e-7)) == 0  # min_lr is only approached at the very end
        assert LRSchedule.from_config(cfg.model.optim, max_steps).warmup_steps == int(0.1 * max_steps)


def test_user_lr_short_run_decays_from_the_users_lr():
    """The reported trap: lr=2e-5, warmup_steps=0, 16 steps, other defaults used to train at min_lr throughout."""
    lrs = _lrs(load_config(["model.optim.lr=2e-5", "model.optim.sched.warmup_steps=0"]), 16)
    assert lrs[0] == pytest.approx(2e-5)
    assert all(b < a for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] > 9e-7


@pytest.mark.parametrize("overrides, steps, match", [
    (["model.optim.sched.warmup_steps=16"], 16, r"warmup_steps \(16\) is not below the run's 16 optimizer steps, so the "
                                                r"lr would never reach model.optim.lr"),
    (["model.optim.sched.name=Constant", "model.optim.sched.warmup_steps=20"], 8, "never reach model.optim.lr"),
    (["model.optim.sched.warmup_steps=0", "model.optim.sched.constant_steps=1000"], 16,
     r"constant_steps \(1000\) \+ warmup \(0\) leave no step to decay over in this run of 16 optimizer steps, so "
     r"the lr would sit at min_lr \(9e-07\) after warmup; lower model.optim.sched.constant_steps"),
    (["model.optim.sched.warmup_steps=4", "model.optim.sched.constant_steps=12"], 16, "leave no step to decay"),
    (["model.optim.sched.warmup_ratio=1.5"], 16, r"warmup_ratio must be in \[0, 1\)"),
    (["model.optim.sched.warmup_steps=-1"], 16, "warmup_steps must be >= 0"),
    (["model.optim.lr=1e-7"], 16, r"min_lr \(9e-07\) is above model.optim.lr"),
])
def test_schedule_that_cannot_do_what_its_keys_say_is_refused(overrides, steps, match):
    with pytest.raises(ConfigError, match=match):
        LRSchedule.from_config(load_config(overrides).model.optim, steps)


def test_schedule_summary_line():
    cfg = load_config(["model.optim.lr=2e-5", "model.optim.sched.min_lr=1e-6"])
    line = LRSchedule.from_config(cfg.model.optim, 20).summary()
    assert line.startswith("lr schedule: CosineAnnealing over 20 steps: warmup 2 step(s) (warmup_ratio 0.1) to "
                           "peak lr 2e-05, cosine decay over 18 step(s) towards min_lr 1e-06, 0 step(s) held at min_lr")
    last = 1e-6 + 1.9e-5 * (1 + math.cos(math.pi * 17 / 18)) / 2  # step 19: 17 of 18 decay steps done
    assert line.endswith(f"last step at lr {last:.3g}")
    cfg = load_config(["model.optim.sched.name=Constant", "model.optim.sched.warmup_steps=3"])
    assert "warmup 3 step(s) (warmup_steps) to peak lr 9e-06, then constant" in \
        LRSchedule.from_config(cfg.model.optim, 8).summary()


def test_adamw_is_fused_on_cpu_and_matches_the_default_update():
    from spinlm.train import adamw

    torch.manual_seed(0)
    a = nn.Linear(16, 8)
    b = nn.Linear(16, 8)
    b.load_state_dict(a.state_dict())
    fused = adamw(list(a.parameters()), lr=1e-2, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1)
    plain = torch.optim.AdamW(list(b.parameters()), lr=1e-2, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1)
    assert fused.param_groups[0]["fused"]
    x = torch.randn(4, 16)
    for _ in range(3):
        for model, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_schedule_without_mixing_is_plain_arithmetic():
    s = StepSchedule(steps_per_epoch=2, max_epochs=2, max_iterations=3)
    assert s.max_steps == 12
    for step in range(12):
        assert s.position(step) == (step // 4, (step // 2) % 2, step % 2)
    assert [step for step in range(13) if s.is_iteration_end(step)] == [4, 8, 12]
    assert s.position(12) == (3, 0, 0)  # the run is done: every iteration completed


def test_schedule_with_mixing_grows_until_k_sets():
    s = StepSchedule(steps_per_epoch=2, max_epochs=1, max_iterations=4, mix_iterations=2)
    assert [s.epoch_steps(t) for t in range(4)] == [2, 4, 4, 4]
    assert s.max_steps == 14
    assert [step for step in range(15) if s.is_iteration_end(step)] == [2, 6, 10, 14]
    assert s.position(5) == (1, 0, 3)
    assert StepSchedule(2, 1, 4, 2, step_cap=7).max_steps == 7
    two_epochs = StepSchedule(steps_per_epoch=1, max_epochs=2, max_iterations=2, mix_iterations=3)
    assert [two_epochs.position(step) for step in range(6)] == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 0, 1),
                                                                (1, 1, 0), (1, 1, 1)]
