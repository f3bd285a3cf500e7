"""BF16AdamW: bf16 weights + int16 low bits are an exact fp32 master weight updated by torch's AdamW."""

import pytest
import torch

from spinlm.model.bf16_adamw import BF16AdamW, master_weight, split_master


def test_split_and_join_are_exact_and_round_to_nearest():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(10000, generator=g) * 10.0 ** torch.randint(-30, 30, (10000,), generator=g),
                   torch.tensor([0.0, -0.0, 1.0, -1.0, 3e38, -3e38, 1e-40, -1e-40])])
    high, low = torch.empty(x.shape, dtype=torch.bfloat16), torch.empty(x.shape, dtype=torch.bfloat16)
    split_master(x, high, low)
    assert torch.equal(master_weight(high, low).view(torch.int32), x.view(torch.int32))  # bit for bit
    # high is the nearest bf16 (ties aside, where torch rounds to even and the split away from zero)
    err = (high.float() - x).abs()
    assert torch.all(err <= (x.bfloat16().float() - x).abs())


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_master_weights_follow_fp32_adamw_bitwise(weight_decay):
    g = torch.Generator().manual_seed(1)
    start = torch.randn(3, 1000, generator=g) * 0.02
    fp32 = torch.nn.Parameter(start.bfloat16().float())  # the master starts at the bf16 weights
    bf16 = torch.nn.Parameter(start.bfloat16())
    kwargs = dict(lr=5e-7, betas=(0.9, 0.98), eps=1e-8, weight_decay=weight_decay)
    reference = torch.optim.AdamW([fp32], foreach=False, fused=False, **kwargs)
    ours = BF16AdamW([bf16], chunk_size=777, **kwargs)  # chunks that do not divide the tensor
    for _ in range(20):
        grad = torch.randn(3, 1000, generator=g).bfloat16()
        fp32.grad, bf16.grad = grad.float(), grad
        reference.step()
        ours.step()
    master = master_weight(bf16.detach(), ours.state[bf16]["master_low"])
    assert torch.equal(master.view(torch.int32), fp32.detach().view(torch.int32))
    assert torch.equal(bf16.detach(), fp32.detach().bfloat16())
    assert not torch.equal(bf16.detach(), start.bfloat16())  # the tiny updates did accumulate
    # plain bf16 AdamW loses them: updates below half a bf16 spacing round away (all but the smallest weights)
    plain = torch.nn.Parameter(start.bfloat16())
    naive = torch.optim.AdamW([plain], foreach=False, **kwargs)
    plain.grad = grad
    for _ in range(20):
        naive.step()
    moved = (plain.detach() != start.bfloat16()).float().mean()
    assert moved < 0.05 and (fp32.detach() != start.bfloat16().float()).all()


def test_state_dict_round_trip_keeps_dtypes():
    p = torch.nn.Parameter(torch.randn(5, 7).bfloat16())
    opt = BF16AdamW([p], lr=1e-3)
    p.grad = torch.randn(5, 7).bfloat16()
    opt.step()
    state = opt.state_dict()
    q = torch.nn.Parameter(p.detach().clone())
    other = BF16AdamW([q], lr=1e-3)
    other.load_state_dict(state)
    for key in ("exp_avg", "exp_avg_sq", "master_low"):
        assert other.state[q][key].dtype == opt.state[p][key].dtype
        assert torch.equal(other.state[q][key].view(torch.int16), opt.state[p][key].view(torch.int16))
    p.grad = q.grad = torch.randn(5, 7).bfloat16()
    opt.step()
    other.step()
    assert torch.equal(p, q)


def test_refuses_fp32_parameters():
    with pytest.raises(TypeError, match="bf16"):
        BF16AdamW([torch.nn.Parameter(torch.zeros(2))])
