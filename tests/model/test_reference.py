import os

os.environ["HF_HUB_OFFLINE"] = "1"

import copy

import pytest
import torch

from spinlm.model.generation import SamplingParams, generate
from spinlm.model.logprobs import masked_sum_logprobs
from spinlm.model.reference import FrozenReference
from spinlm.model.tiny import build_tiny_model


@pytest.fixture(scope="module")
def base_model(tokenizer):
    return build_tiny_model(tokenizer)


@pytest.fixture()
def policy(base_model):
    return copy.deepcopy(base_model)


@pytest.fixture(scope="module")
def batch(tokenizer):
    ids = torch.tensor([tokenizer.encode("What is 12 + 7? The answer is 19.")])
    masks = torch.zeros_like(ids, dtype=torch.bool)
    masks[:, 5:] = True
    return ids, masks


def _perturb(model) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)


def _greedy_answers(model, tokenizer) -> list[list[int]]:
    prompts = [tokenizer.encode("Hello!"), tokenizer.encode("def f(x):")]
    return generate(model, tokenizer, prompts, SamplingParams(use_greedy=True, max_length=8)).ids


def test_frozen_copy(policy):
    ref = FrozenReference.copy_of(policy)
    assert all(not p.requires_grad for p in ref.module.parameters())
    assert all(p.requires_grad for p in policy.parameters())
    assert not ref.module.training
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(ref.module.parameters(), policy.parameters()))


def test_reference_ignores_policy_updates(policy, tokenizer, batch):
    ref = FrozenReference.copy_of(policy)
    before_lp = ref.logprobs(*batch)
    with ref.active() as module:
        before_gen = _greedy_answers(module, tokenizer)
    _perturb(policy)
    assert not torch.allclose(masked_sum_logprobs(policy, *batch), before_lp)
    torch.testing.assert_close(ref.logprobs(*batch), before_lp, rtol=0, atol=0)
    with ref.active() as module:
        assert _greedy_answers(module, tokenizer) == before_gen
    assert not ref.logprobs(*batch).requires_grad


def test_refresh_from_copies_in_place(policy, batch):
    ref = FrozenReference.copy_of(policy)
    _perturb(policy)
    ptrs = [p.data_ptr() for p in ref.module.parameters()]
    ref.refresh_from(policy)
    assert [p.data_ptr() for p in ref.module.parameters()] == ptrs
    torch.testing.assert_close(ref.logprobs(*batch), masked_sum_logprobs(policy, *batch).detach(), rtol=0, atol=0)
    assert all(not p.requires_grad for p in ref.module.parameters())


def test_state_dict_round_trip(policy, batch):
    ref = FrozenReference.copy_of(policy)
    saved = {k: v.clone() for k, v in ref.state_dict().items()}
    expected = ref.logprobs(*batch)
    _perturb(ref.module)
    ref.load_state_dict(saved)
    torch.testing.assert_close(ref.logprobs(*batch, micro_batch_size=1), expected)


def test_tied_weights_stay_tied(tokenizer):
    policy = build_tiny_model(tokenizer)
    policy.config.tie_word_embeddings = True
    policy.tie_weights()
    assert policy.lm_head.weight is policy.model.embed_tokens.weight
    ref = FrozenReference.copy_of(policy)
    assert ref.module.lm_head.weight is ref.module.model.embed_tokens.weight
    assert ref.module.lm_head.weight is not policy.lm_head.weight
