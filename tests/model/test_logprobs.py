import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
import torch.nn.functional as F

from spinlm.model.logprobs import masked_mean_nll, masked_sum_logprobs, token_logprobs
from spinlm.model.tiny import build_tiny_model, build_tiny_tokenizer


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(build_tiny_tokenizer()).eval()


def _naive_token_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """Position by position: full log_softmax of the prefix's last logits."""
    out = torch.zeros(ids.shape)
    for b in range(ids.shape[0]):
        for i in range(1, ids.shape[1]):
            logits = model(input_ids=ids[b : b + 1, :i]).logits[0, -1]
            out[b, i] = F.log_softmax(logits.float(), dim=-1)[ids[b, i]]
    return out


def _ids(seed: int, shape: tuple[int, int]) -> torch.Tensor:
    return torch.randint(0, 300, shape, generator=torch.Generator().manual_seed(seed))


def test_token_logprobs_matches_naive(model):
    ids = _ids(0, (2, 7))
    with torch.no_grad():
        got = token_logprobs(model, ids)
        torch.testing.assert_close(got, _naive_token_logprobs(model, ids), atol=1e-5, rtol=1e-5)
    assert torch.all(got[:, 0] == 0)


def test_right_padding_does_not_change_masked_sum(model):
    long, short = _ids(1, (1, 9))[0], _ids(2, (1, 5))[0]
    pad = 0
    batch = torch.stack([long, torch.cat([short, torch.full((4,), pad)])])
    masks = torch.zeros(2, 9, dtype=torch.bool)
    masks[0, 3:9] = True
    masks[1, 2:5] = True
    with torch.no_grad():
        together = masked_sum_logprobs(model, batch, masks)
        alone_long = masked_sum_logprobs(model, long[None], masks[:1])
        alone_short = masked_sum_logprobs(model, short[None], masks[1:, :5])
    torch.testing.assert_close(together, torch.cat([alone_long, alone_short]), atol=1e-5, rtol=1e-5)


def test_masked_sum_keeps_grad_by_default(model):
    ids = _ids(3, (2, 6))
    masks = torch.ones_like(ids, dtype=torch.bool)
    assert masked_sum_logprobs(model, ids, masks).requires_grad


def test_micro_batches_give_same_result_without_grad(model):
    ids = _ids(4, (5, 8))
    masks = torch.rand(5, 8, generator=torch.Generator().manual_seed(0)) > 0.4
    full = masked_sum_logprobs(model, ids, masks).detach()
    chunked = masked_sum_logprobs(model, ids, masks, micro_batch_size=2)
    assert not chunked.requires_grad
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)


def test_masked_mean_nll_matches_cross_entropy(model):
    ids = _ids(5, (3, 6))
    masks = torch.zeros_like(ids, dtype=torch.bool)
    masks[:, 3:] = True
    masks[2, 5] = False
    labels = ids.masked_fill(~masks, -100)[:, 1:]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
        expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        torch.testing.assert_close(masked_mean_nll(model, ids, masks), expected, atol=1e-5, rtol=1e-5)


def test_masked_mean_nll_rejects_empty_mask(model):
    ids = _ids(6, (1, 4))
    with pytest.raises(ValueError):
        masked_mean_nll(model, ids, torch.zeros_like(ids, dtype=torch.bool))


def test_answer_logprob_sums_match_the_full_head_with_a_graph(model):
    from spinlm.model.logprobs import answer_logprob_sums

    ids = _ids(3, (3, 12))
    masks = torch.zeros(3, 12, dtype=torch.bool)
    masks[0, 4:9], masks[1, 1:12], masks[2, 2:3], masks[2, 7:10] = True, True, True, True  # gaps too
    got = answer_logprob_sums(model, ids, masks)
    torch.testing.assert_close(got, masked_sum_logprobs(model, ids, masks), atol=1e-5, rtol=1e-5)
    got.sum().backward()
    assert next(model.parameters()).grad is not None
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_target_logprobs_equal_log_softmax_values_and_gradients(dtype):
    """The chunked function (no float32 copy of the logits kept) against log_softmax of the upcast logits,
    with a row that predicts two targets (packed pairs: both answers' first token from the prompt's end)."""
    from spinlm.model.logprobs import target_logprobs

    torch.manual_seed(0)
    logits = (torch.randn(7, 300) * 4).to(dtype)
    rows, targets = torch.tensor([0, 1, 1, 2, 3, 4, 5, 6, 6]), torch.randint(0, 300, (9,))
    weights = torch.randn(9)
    got_x, want_x = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    got = target_logprobs(got_x, rows, targets, chunk=3)
    want = torch.log_softmax(want_x.float(), dim=-1)[rows, targets]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    assert got_x.grad.dtype == dtype
    torch.testing.assert_close(got_x.grad, want_x.grad, atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=1e-5)
    with torch.no_grad():  # reference log-probs: no graph
        torch.testing.assert_close(target_logprobs(logits, rows, targets, chunk=3), want.detach())
