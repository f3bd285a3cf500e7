import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from spinlm.model.generation import (
    SamplingParams,
    build_generation_config,
    generate,
    plan_batches,
    stop_token_ids,
)
from spinlm.model.tiny import build_tiny_model

TEXTS = ["Hello!", "What is 12 + 7? The answer", "def f(x):", "The quick brown fox jumps over", "user"]


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_tiny_model(tokenizer)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(t) for t in TEXTS]


def _argmax_loop(model, prompt: list[int], max_new: int, stop_ids: set[int]) -> list[int]:
    """Reference greedy decoding: a full forward over the unpadded sequence at every step, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] in stop_ids:
                break
    return ids[len(prompt) :]


def _greedy(max_length: int, end_strings: list[str] | None = None, min_length: int = 1) -> SamplingParams:
    return SamplingParams(use_greedy=True, max_length=max_length, min_length=min_length, end_strings=end_strings or [])


def test_stop_token_ids(tokenizer):
    ids = stop_token_ids(tokenizer, ["<|endoftext|>", "<extra_id_1>"])
    assert ids == [tokenizer.convert_tokens_to_ids("<|endoftext|>"), tokenizer.eos_token_id]


def test_generation_config_is_explicit():
    config = build_generation_config(SamplingParams(), [1, 2], 0, [])
    assert config.do_sample and config.top_k == 0 and config.top_p == 1.0 and config.temperature == 1.0
    assert config.max_new_tokens == 256 and config.min_new_tokens == 1 and config.eos_token_id == [1, 2]


def test_greedy_equals_argmax_loop_in_prompt_order(model, tokenizer, prompts):
    stop = set(stop_token_ids(tokenizer, []))
    got = generate(model, tokenizer, prompts, _greedy(12), batch_size=2)
    expected = [_argmax_loop(model, p, 12, stop) for p in prompts]
    assert got.ids == expected  # batches are length-sorted and left-padded; order is restored
    assert got.truncated == [stop.isdisjoint(ids) for ids in expected]


def test_stops_at_stop_token_and_keeps_it(model, tokenizer, prompts):
    free = generate(model, tokenizer, prompts[:1], _greedy(8)).ids[0]
    stop_token = tokenizer.convert_ids_to_tokens(free[3])
    got = generate(model, tokenizer, prompts[:1], _greedy(8, [stop_token]))
    first = free.index(free[3])
    assert got.ids == [free[: first + 1]]
    assert got.truncated == [False] and got.num_truncated == 0


def test_truncated_when_max_length_hit_and_nothing_appended(model, tokenizer, prompts):
    stop = set(stop_token_ids(tokenizer, []))
    got = generate(model, tokenizer, prompts, _greedy(4))
    for ids, truncated, prompt in zip(got.ids, got.truncated, prompts):
        assert ids == _argmax_loop(model, prompt, 4, stop)
        assert truncated == (len(ids) == 4 and ids[-1] not in stop)
    assert got.num_truncated == sum(got.truncated) > 0
    assert all(n <= 4 for n in got.lengths)


def test_min_length_suppresses_early_stop(model, tokenizer, prompts):
    free = generate(model, tokenizer, prompts[:1], _greedy(8)).ids[0]
    stop_token = tokenizer.convert_ids_to_tokens(free[0])
    assert generate(model, tokenizer, prompts[:1], _greedy(8, [stop_token], min_length=0)).ids == [free[:1]]
    got = generate(model, tokenizer, prompts[:1], _greedy(8, [stop_token], min_length=3))
    assert got.lengths[0] >= 3 and free[0] not in got.ids[0][:3]


def test_multi_token_stop_string_counts_as_stopped(model, tokenizer, prompts):
    free = generate(model, tokenizer, prompts[1:2], _greedy(10)).ids[0]
    end = tokenizer.decode(free[2:4])
    assert len(tokenizer.encode(end, add_special_tokens=False)) > 1, "pick another position"
    got = generate(model, tokenizer, prompts[1:2], _greedy(10, [end]))
    assert got.truncated == [False]
    assert end in tokenizer.decode(got.ids[0]) and end not in tokenizer.decode(got.ids[0][:-1])
    assert got.ids[0] == free[: len(got.ids[0])]


def test_seeded_sampling_is_reproducible(model, tokenizer, prompts):
    params = SamplingParams(max_length=10, end_strings=[])
    a = generate(model, tokenizer, prompts, params, batch_size=2, generator_seed=7)
    b = generate(model, tokenizer, prompts, params, batch_size=2, generator_seed=7)
    c = generate(model, tokenizer, prompts, params, batch_size=2, generator_seed=8)
    assert a == b and a.ids != c.ids


def test_plan_batches_groups_by_length_and_covers_every_prompt():
    prompts = [[1] * n for n in (5, 1, 3, 4, 2)]
    plan = plan_batches(prompts, 2)
    assert plan == [[1, 4], [2, 3], [0]]
    with pytest.raises(ValueError):
        plan_batches(prompts, 0)


def test_seeded_generation_leaves_the_global_rng_alone(model, tokenizer, prompts):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate(model, tokenizer, prompts, SamplingParams(max_length=8), generator_seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_model_generation_config_does_not_leak(model, tokenizer, prompts):
    """A model generation_config with top_k=1 would make sampling greedy if HF fell back to it."""
    saved = model.generation_config.top_k
    model.generation_config.top_k = 1
    try:
        greedy = generate(model, tokenizer, prompts, _greedy(10)).ids
        params = SamplingParams(top_k=0, max_length=10, end_strings=[])
        samples = [generate(model, tokenizer, prompts, params, generator_seed=s).ids for s in range(3)]
    finally:
        model.generation_config.top_k = saved
    assert model.generation_config.top_k == saved
    assert all(s != greedy for s in samples)
    assert samples[0] != samples[1]


def test_restores_training_mode_and_no_grad(model, tokenizer, prompts):
    model.train()
    try:
        generate(model, tokenizer, prompts[:2], _greedy(2))
        assert model.training
    finally:
        model.eval()
    generate(model, tokenizer, prompts[:2], _greedy(2))
    assert not model.training
