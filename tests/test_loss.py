"""SPIN losses and reward metrics against numbers computed by hand with `math`."""

import math
import statistics

import pytest
import torch

from spinlm.loss import LOSSES, hinge_loss, ipo_loss, reward_metrics, sigmoid_loss, spin_loss

# Two pairs: summed answer log-probs of the policy and the reference.
POLICY_ACT = [-3.0, -5.0]
POLICY_GEN = [-6.0, -4.0]
REF_ACT = [-4.0, -4.5]
REF_GEN = [-5.0, -4.2]
# r_act = [1.0, -0.5], r_gen = [-1.0, 0.2], d = r_act - r_gen = [2.0, -0.7]
R_ACT = [1.0, -0.5]
R_GEN = [-1.0, 0.2]
D = [2.0, -0.7]


def _t(xs):
    return torch.tensor(xs, dtype=torch.float64)


def _hand_sigmoid(d, beta):
    return -math.log(1.0 / (1.0 + math.exp(-beta * d)))


def _hand_hinge(d, beta):
    return max(0.0, 1.0 - beta * d)


def _hand_ipo(d, beta):
    return (d - 1.0 / (2.0 * beta)) ** 2


def _spin(beta, loss_type, pa=POLICY_ACT, pg=POLICY_GEN, ra=REF_ACT, rg=REF_GEN):
    return spin_loss(_t(pa), _t(pg), _t(ra), _t(rg), beta=beta, loss_type=loss_type)


def test_losses_registry_names():
    assert set(LOSSES) == {"sigmoid", "hinge", "ipo"}
    assert LOSSES["sigmoid"] is sigmoid_loss
    assert LOSSES["hinge"] is hinge_loss
    assert LOSSES["ipo"] is ipo_loss


@pytest.mark.parametrize("beta", [0.2, 1.0, 5.0])
@pytest.mark.parametrize(
    "loss_type,hand",
    [("sigmoid", _hand_sigmoid), ("hinge", _hand_hinge), ("ipo", _hand_ipo)],
)
def test_spin_loss_matches_hand_computed(loss_type, hand, beta):
    out = _spin(beta, loss_type)
    expected = [hand(d, beta) for d in D]
    assert out.losses.shape == (2,)
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_concrete_values_beta_0_2():
    """Spelled-out numbers for beta = 0.2 (d = [2.0, -0.7])."""
    s = _spin(0.2, "sigmoid").losses.tolist()
    assert s == pytest.approx([math.log1p(math.exp(-0.4)), math.log1p(math.exp(0.14))], rel=1e-12)
    assert _spin(0.2, "hinge").losses.tolist() == pytest.approx([0.6, 1.14], rel=1e-12)
    # 1 / (2 * 0.2) = 2.5: (2 - 2.5)^2 = 0.25, (-0.7 - 2.5)^2 = 10.24
    assert _spin(0.2, "ipo").losses.tolist() == pytest.approx([0.25, 10.24], rel=1e-12)


def test_hinge_is_zero_beyond_margin():
    # beta = 5: 1 - 5 * 2 = -9 -> 0 ; 1 - 5 * (-0.7) = 4.5
    assert _spin(5.0, "hinge").losses.tolist() == pytest.approx([0.0, 4.5], abs=1e-12)


@pytest.mark.parametrize("d", [-30.0, -2.5, -0.1, 0.0, 0.3, 4.0, 30.0])
@pytest.mark.parametrize("beta", [0.1, 0.2, 2.0])
def test_sigmoid_is_minus_log_sigmoid(d, beta):
    got = sigmoid_loss(torch.tensor([d], dtype=torch.float64), beta).item()
    assert got == pytest.approx(-math.log(1.0 / (1.0 + math.exp(-beta * d))), rel=1e-10, abs=1e-14)
    assert got >= 0.0


def test_sigmoid_at_zero_margin_is_log2():
    zero = torch.zeros(3)
    assert sigmoid_loss(zero, 0.2).tolist() == pytest.approx([math.log(2.0)] * 3, rel=1e-6)
    # equal policy/ref ratios for both answers -> d = 0 whatever beta is
    out = spin_loss(_t([-2.0]), _t([-7.0]), _t([-2.0]), _t([-7.0]), beta=3.0)
    assert out.losses.item() == pytest.approx(math.log(2.0), rel=1e-12)


def test_sigmoid_is_finite_for_large_margins():
    d = torch.tensor([-1e4, 1e4], dtype=torch.float32)
    losses = sigmoid_loss(d, 1.0)
    assert torch.isfinite(losses).all()
    assert losses[0].item() == pytest.approx(1e4, rel=1e-6)
    assert losses[1].item() == pytest.approx(0.0, abs=1e-6)


def test_default_loss_type_is_sigmoid():
    a = spin_loss(_t(POLICY_ACT), _t(POLICY_GEN), _t(REF_ACT), _t(REF_GEN), beta=0.2).losses
    assert a.tolist() == pytest.approx([_hand_sigmoid(d, 0.2) for d in D], rel=1e-12)


def test_unknown_loss_type_raises():
    with pytest.raises(KeyError):
        _spin(0.2, "nope")


@pytest.mark.parametrize("beta", [0.2, 0.5])
def test_rewards_include_beta_and_are_detached(beta):
    pa = _t(POLICY_ACT).requires_grad_()
    pg = _t(POLICY_GEN).requires_grad_()
    out = spin_loss(pa, pg, _t(REF_ACT), _t(REF_GEN), beta=beta)
    assert out.rewards_actual.tolist() == pytest.approx([beta * r for r in R_ACT], rel=1e-12)
    assert out.rewards_generated.tolist() == pytest.approx([beta * r for r in R_GEN], rel=1e-12)
    assert not out.rewards_actual.requires_grad
    assert not out.rewards_generated.requires_grad
    assert out.losses.requires_grad


def test_gradient_direction_sigmoid():
    """Raising log pi(y|x) of the ground truth lowers the loss; raising log pi(y'|x) raises it."""
    beta = 0.2
    pa = _t(POLICY_ACT).requires_grad_()
    pg = _t(POLICY_GEN).requires_grad_()
    spin_loss(pa, pg, _t(REF_ACT), _t(REF_GEN), beta=beta).losses.mean().backward()
    assert (pa.grad < 0).all()
    assert (pg.grad > 0).all()
    # d/dpa of mean(softplus(-beta d)) = -beta * sigmoid(-beta d) / B
    expected = [-beta * (1.0 / (1.0 + math.exp(beta * d))) / 2 for d in D]
    assert pa.grad.tolist() == pytest.approx(expected, rel=1e-10)
    assert pg.grad.tolist() == pytest.approx([-g for g in expected], rel=1e-10)

    # and a finite step in that direction actually lowers the loss
    before = spin_loss(_t(POLICY_ACT), _t(POLICY_GEN), _t(REF_ACT), _t(REF_GEN), beta).losses
    after = spin_loss(_t(POLICY_ACT) + 0.5, _t(POLICY_GEN), _t(REF_ACT), _t(REF_GEN), beta).losses
    assert (after < before).all()


def test_reference_logps_enter_with_opposite_sign():
    """The reference enters with the opposite sign: raising ref log-prob of y raises the loss."""
    beta = 0.2
    base = _spin(beta, "sigmoid").losses
    higher_ref = spin_loss(_t(POLICY_ACT), _t(POLICY_GEN), _t(REF_ACT) + 0.5, _t(REF_GEN), beta).losses
    assert (higher_ref > base).all()


def test_reward_metrics_by_hand():
    ra = [0.2, -0.1, 0.5, 0.0]
    rg = [-0.3, 0.4, 0.1, 0.0]  # ground truth preferred in pairs 0 and 2; tie in pair 3 does not count
    m = reward_metrics(torch.tensor(ra), torch.tensor(rg))
    assert m["acc"] == pytest.approx(0.5)
    assert m["rewards_actual_mean"] == pytest.approx(sum(ra) / 4)
    assert m["rewards_generated_mean"] == pytest.approx(sum(rg) / 4)
    assert m["rewards_all_mean"] == pytest.approx(sum(ra + rg) / 8)
    assert m["rewards_all_std"] == pytest.approx(statistics.stdev(ra + rg), rel=1e-6)  # sample std, as torch
    assert m["reward_margin_mean"] == pytest.approx(sum(a - g for a, g in zip(ra, rg)) / 4)
    assert all(isinstance(v, float) for v in m.values())


def test_reward_metrics_single_pair():
    m = reward_metrics(torch.tensor([0.3]), torch.tensor([0.1]))
    assert m["acc"] == 1.0
    assert m["rewards_all_std"] == pytest.approx(statistics.stdev([0.3, 0.1]), rel=1e-6)
    assert m["reward_margin_mean"] == pytest.approx(0.2, rel=1e-6)


def test_reward_metrics_from_spin_loss_rewards():
    out = _spin(0.2, "sigmoid")
    m = reward_metrics(out.rewards_actual, out.rewards_generated)
    # beta * r_act = [0.2, -0.1], beta * r_gen = [-0.2, 0.04]
    assert m["acc"] == pytest.approx(0.5)
    assert m["reward_margin_mean"] == pytest.approx((0.4 + -0.14) / 2, rel=1e-6)  # metrics are float32


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
@pytest.mark.parametrize("micro", [1, 2, 3, 6])
def test_micro_batch_split_invariance(loss_type, micro):
    """sum over micro batches of (sum of per-pair losses / global_batch) == mean over the batch,
    for the value and the gradients."""
    g = torch.Generator().manual_seed(0)
    n = 6
    pa0, pg0 = -10 * torch.rand(n, generator=g, dtype=torch.float64), -10 * torch.rand(n, generator=g, dtype=torch.float64)
    ra, rg = -10 * torch.rand(n, generator=g, dtype=torch.float64), -10 * torch.rand(n, generator=g, dtype=torch.float64)
    beta = 0.3

    pa, pg = pa0.clone().requires_grad_(), pg0.clone().requires_grad_()
    full = spin_loss(pa, pg, ra, rg, beta, loss_type).losses.mean()
    full.backward()
    full_grads = (pa.grad.clone(), pg.grad.clone())
    # independent expectation: plain python mean of the hand formula
    hand = {"sigmoid": _hand_sigmoid, "hinge": _hand_hinge, "ipo": _hand_ipo}[loss_type]
    ds = [(a - b) - (c - e) for a, c, b, e in zip(pa0.tolist(), pg0.tolist(), ra.tolist(), rg.tolist())]
    assert full.item() == pytest.approx(sum(hand(d, beta) for d in ds) / n, rel=1e-10)

    pa, pg = pa0.clone().requires_grad_(), pg0.clone().requires_grad_()
    total = 0.0
    for start in range(0, n, micro):
        sl = slice(start, start + micro)
        part = spin_loss(pa[sl], pg[sl], ra[sl], rg[sl], beta, loss_type).losses.sum() / n
        part.backward()  # accumulate gradients as in gradient accumulation
        total += part.item()
    assert total == pytest.approx(full.item(), rel=1e-12)
    assert torch.allclose(pa.grad, full_grads[0], rtol=1e-12, atol=1e-15)
    assert torch.allclose(pg.grad, full_grads[1], rtol=1e-12, atol=1e-15)
