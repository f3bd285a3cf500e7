"""Cached decoding (spinlm.model.decoding) against HF generate and against a fresh forward."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from spinlm.algorithms.scoring import pair_logprobs
from spinlm.model.decoding import (
    _process, _sample, _warp, decode_batch, length_chunks, prefix_groups, supports_cached_decoding,
)
from spinlm.model.generation import SamplingParams, generate
from spinlm.model.tiny import build_tiny_model

TEXTS = ["Hello!", "What is 12 + 7? The answer", "def f(x):", "The quick brown fox jumps over", "user", "Hi"]


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_tiny_model(tokenizer, seed=1).eval()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer.encode(t) for t in TEXTS]


def test_tiny_model_supports_cached_decoding(model):
    assert supports_cached_decoding(model)


def test_sliding_window_models_fall_back(tokenizer):
    model = build_tiny_model(tokenizer)
    model.config.sliding_window = 16
    assert not supports_cached_decoding(model)


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_equals_hf_generate(model, tokenizer, prompts, penalty):
    if penalty != 1.0:  # HF penalises the pad id of left-padded rows; equal lengths avoid padding
        prompts = [p[:2] for p in prompts if len(p) >= 2]
    free = SamplingParams(use_greedy=True, max_length=20, min_length=3, repetition_penalty=penalty, end_strings=[])
    first = generate(model, tokenizer, prompts, free, batch_size=8, cached_decoding=False)
    # stop at tokens the rows produce mid-way, so rows finish at different steps (and leave the batch)
    stops = {first.ids[0][5], first.ids[1][8]}
    params = SamplingParams(use_greedy=True, max_length=20, min_length=3, repetition_penalty=penalty,
                            end_strings=tokenizer.convert_ids_to_tokens(sorted(stops)))
    ours = generate(model, tokenizer, prompts, params, batch_size=8, cached_decoding=True)
    hf = generate(model, tokenizer, prompts, params, batch_size=8, cached_decoding=False)
    assert ours.ids == hf.ids
    assert ours.truncated == hf.truncated
    assert any(not t for t in ours.truncated) and any(ours.truncated)


def test_own_and_answer_logprobs_equal_a_fresh_forward(model, tokenizer, prompts):
    answers = [tokenizer.encode(t) + [tokenizer.eos_token_id] for t in ["Hi there", "19.", "return x", "the dog", "ok", "a b c d e f"]]
    params = SamplingParams(temperature=0.7, top_p=0.9, max_length=12, end_strings=[])
    gens = generate(model, tokenizer, prompts, params, batch_size=4, generator_seed=3, answers=answers)
    with torch.no_grad():
        act, gen = pair_logprobs(model, prompts, answers, gens.ids, tokenizer.pad_token_id, packed=False)
    torch.testing.assert_close(torch.tensor(gens.answer_logps), act, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(gens.logps), gen, atol=1e-4, rtol=1e-5)


def test_sampling_follows_the_warped_distribution(model, prompts):
    """First sampled token frequencies over many rows match softmax of the processed, warped logits."""
    n = 4000
    prompt = prompts[1]
    torch.manual_seed(0)
    out = decode_batch(model, [prompt] * n, pad_id=0, stop_ids=[], max_new_tokens=1,
                       temperature=0.8, top_k=20, top_p=0.9)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[:, -1].float()
    probs = torch.softmax(_warp(logits, 0.8, 20, 0.9), dim=-1)[0]
    counts = torch.bincount(torch.tensor([t[0] for t in out.tokens]), minlength=probs.numel()).float() / n
    assert counts[probs == 0].sum() == 0  # nothing outside top-k / top-p is ever sampled
    assert (counts - probs).abs().max() < 0.03


def test_warp_matches_hf_warpers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    ids = torch.zeros(3, 1, dtype=torch.long)
    expected = TopPLogitsWarper(0.8)(ids, TopKLogitsWarper(10)(ids, TemperatureLogitsWarper(0.7)(ids, scores)))
    torch.testing.assert_close(_warp(scores, 0.7, 10, 0.8), expected)


def test_repetition_penalty_matches_hf_and_ignores_pads():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    scores = torch.randn(2, 30, generator=torch.Generator().manual_seed(1))
    history = torch.tensor([[3, 5, 5, 7], [-1, -1, 0, 9]])  # -1 = left pad
    got = _process(scores, history, step=5, stop=torch.tensor([]), min_new=0, penalty=1.5)
    expected = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([[3, 5, 5, 7], [0, 0, 0, 9]]), scores.clone())
    torch.testing.assert_close(got, expected)
    pad_only = _process(scores, torch.tensor([[-1, 4], [-1, 4]]), step=5, stop=torch.tensor([]), min_new=0, penalty=1.5)
    assert torch.equal(pad_only[:, 0], scores[:, 0])  # id 0 appears only as padding: not penalised


def test_min_new_tokens_blocks_stop_ids():
    scores = torch.zeros(1, 5)
    out = _process(scores, torch.zeros(1, 1, dtype=torch.long), step=0, stop=torch.tensor([2]), min_new=1, penalty=1.0)
    assert out[0, 2] == float("-inf") and scores[0, 2] == 0
    assert torch.equal(_process(scores, torch.zeros(1, 1, dtype=torch.long), 1, torch.tensor([2]), 1, 1.0), scores)


SYSTEM = "You are a careful assistant. Answer in one sentence."


@pytest.fixture(scope="module")
def chat_prompts(tokenizer):
    """Prompts that share openings of different lengths (as chat templates make them), and some that share nothing."""
    system, other = tokenizer.encode(SYSTEM), tokenizer.encode("Be brief.")
    rows = [system + tokenizer.encode(t) for t in TEXTS] + [other + tokenizer.encode(t) for t in TEXTS[:3]]
    return rows + [tokenizer.encode(t) for t in ["Bye now", "Zebra crossing ahead", "12 + 7"]]


def test_prefix_groups_share_true_prefixes(chat_prompts):
    groups = prefix_groups(chat_prompts)
    assert sorted(r for _, rows in groups for r in rows) == list(range(len(chat_prompts)))
    shared = [(k, rows) for k, rows in groups if k]
    assert len(shared) >= 2  # both openings found
    for k, rows in shared:
        assert len(rows) > 1
        assert all(chat_prompts[r][:k] == chat_prompts[rows[0]][:k] and len(chat_prompts[r]) > k for r in rows)


def test_length_chunks_cover_rows_and_weigh_padding_against_passes():
    lengths = [5, 5, 6, 40, 41, 5, 90]
    chunks = length_chunks(lengths, overhead=16)
    assert sorted(r for c in chunks for r in c) == list(range(len(lengths)))
    assert {frozenset(c) for c in chunks} == {frozenset({0, 1, 2, 5}), frozenset({3, 4}), frozenset({6})}
    assert length_chunks(lengths, overhead=10_000) == [[0, 1, 5, 2, 3, 4, 6]]  # one pass when passes are dear
    assert length_chunks([4] * 9, max_tokens=12) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]  # 12 tokens at most


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_with_shared_prefixes_equals_hf_generate(model, tokenizer, chat_prompts, penalty):
    """Prefix-sharing, length-chunked prefill (holes in the cache) decodes exactly like one padded batch."""
    if penalty != 1.0:  # HF penalises the pad id of left-padded rows: equal lengths avoid padding
        chat_prompts = [p[:8] for p in chat_prompts if len(p) >= 8]
    params = SamplingParams(use_greedy=True, max_length=12, repetition_penalty=penalty, end_strings=[])
    ours = generate(model, tokenizer, chat_prompts, params, batch_size=16, cached_decoding=True)
    hf = generate(model, tokenizer, chat_prompts, params, batch_size=16, cached_decoding=False)
    assert ours.ids == hf.ids


def test_logprobs_with_shared_prefixes_equal_a_fresh_forward(model, tokenizer, chat_prompts):
    answers = [tokenizer.encode(f"answer {k} " * (1 + k % 4)) + [tokenizer.eos_token_id] for k in range(len(chat_prompts))]
    params = SamplingParams(temperature=1.0, max_length=10, end_strings=[])
    gens = generate(model, tokenizer, chat_prompts, params, batch_size=16, generator_seed=5, answers=answers)
    with torch.no_grad():
        act, gen = pair_logprobs(model, chat_prompts, answers, gens.ids, tokenizer.pad_token_id, packed=False)
    torch.testing.assert_close(torch.tensor(gens.answer_logps), act, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(gens.logps), gen, atol=1e-4, rtol=1e-5)


def test_sampler_matches_multinomial_distribution():
    probs = torch.softmax(torch.randn(3, 40, generator=torch.Generator().manual_seed(2)) * 2, dim=-1)
    probs[:, 7] = 0  # a filtered token
    torch.manual_seed(0)
    draws = torch.stack([_sample(probs) for _ in range(6000)])  # (6000, 3)
    for row in range(3):
        freq = torch.bincount(draws[:, row], minlength=40).float() / len(draws)
        assert freq[7] == 0
        assert (freq - probs[row]).abs().max() < 0.02
