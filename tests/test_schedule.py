"""The CosineAnnealing LR multiplier and build_optimizer."""

import math

import pytest
import torch
from torch import nn

from spinlm.config import load_config
from spinlm.train import build_optimizer, cosine_annealing


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
    """Documented behaviour: no room to decay -> warmup to the peak, then straight to min_ratio.
    (The packaged defaults do this for any run shorter than 1010 steps.)"""
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


def test_build_optimizer_constant_schedule():
    cfg = _cfg("model.optim.sched.name=Constant")
    opt, sched = build_optimizer(cfg, nn.Linear(2, 2), max_steps=5)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1e-3] * 5)


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
