import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from spinlm.data.collate import spin_custom_collate
from spinlm.model.logprobs import masked_sum_logprobs
from spinlm.model.packed import pack_pairs, packed_pair_logprobs, supports_packed_pairs
from spinlm.model.tiny import build_tiny_model, build_tiny_tokenizer

PAD = 0


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(build_tiny_tokenizer(), seed=3).eval()


def _seqs(seed: int, lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 300, (n,), generator=g).tolist() for n in lengths]


def _padded(model, prompts, answers):
    b = spin_custom_collate([{"prompt_ids": p, "answer_ids": a} for p, a in zip(prompts, answers)], PAD)
    return masked_sum_logprobs(model, b["prompts_and_answers"], b["masks"])


def test_tiny_model_supports_packed_pairs(model):
    assert supports_packed_pairs(model)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_two_padded_rows(model, attn):
    model.config._attn_implementation = attn
    prompts = _seqs(0, [7, 3, 12, 1])
    actual = _seqs(1, [5, 9, 1, 4])
    generated = _seqs(2, [8, 1, 6, 11])
    with torch.no_grad():
        act, gen = packed_pair_logprobs(model, pack_pairs(prompts, actual, generated, PAD))
        torch.testing.assert_close(act, _padded(model, prompts, actual), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gen, _padded(model, prompts, generated), atol=1e-5, rtol=1e-5)
    model.config._attn_implementation = "sdpa"


def test_packed_gradients_equal_padded(model):
    prompts, actual, generated = _seqs(3, [6, 4]), _seqs(4, [3, 7]), _seqs(5, [5, 2])
    params = [p for p in model.parameters()]

    def grads(fn):
        model.zero_grad(set_to_none=True)
        a, g = fn()
        (a.sum() - 0.5 * g.sum()).backward()
        return [p.grad.clone() for p in params]

    packed = grads(lambda: packed_pair_logprobs(model, pack_pairs(prompts, actual, generated, PAD)))
    padded = grads(lambda: (_padded(model, prompts, actual), _padded(model, prompts, generated)))
    for x, y in zip(packed, padded):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
    model.zero_grad(set_to_none=True)


def test_answers_do_not_see_each_other(model):
    """Changing the ground-truth answer leaves the generated answer's log-prob unchanged."""
    prompts, generated = _seqs(6, [5]), _seqs(7, [6])
    with torch.no_grad():
        _, gen_a = packed_pair_logprobs(model, pack_pairs(prompts, _seqs(8, [4]), generated, PAD))
        _, gen_b = packed_pair_logprobs(model, pack_pairs(prompts, _seqs(9, [10]), generated, PAD))
    torch.testing.assert_close(gen_a, gen_b, atol=1e-6, rtol=0)


def test_empty_generated_answer_scores_zero(model):
    with torch.no_grad():
        act, gen = packed_pair_logprobs(model, pack_pairs(_seqs(10, [4]), _seqs(11, [3]), [[]], PAD))
    assert gen.item() == 0.0 and act.item() < 0


def test_rejects_empty_prompt():
    with pytest.raises(ValueError):
        pack_pairs([[]], [[1]], [[2]], PAD)
