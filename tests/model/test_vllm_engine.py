"""The vLLM backend on the tiny model, fp32, against spinlm's decoder on the same weights.

Needs vLLM (`pip install -e '.[vllm]'`); skipped where it is not installed. One engine serves the
module (its KV cache capped at 64 MiB). The tiny model here has head_dim 32: vLLM's CPU attention
has no kernel for the default tiny model's head_dim 8 (see the error test).
"""

import pytest
import torch

pytest.importorskip("vllm")

from spinlm.errors import ConfigError  # noqa: E402
from spinlm.model.generation import DecoderBackend, SamplingParams, StopRule, sub_seed  # noqa: E402
from spinlm.model.tiny import build_tiny_model  # noqa: E402
from spinlm.model.vllm_engine import EngineSettings, VLLMBackend, sampling_params  # noqa: E402

pytestmark = pytest.mark.vllm

SETTINGS = EngineSettings(dtype="float32", max_model_len=256, gpu_memory_utilization=0.3, tensor_parallel_size=1,
                          enforce_eager=True, max_num_seqs=64, kv_cache_bytes=64 << 20, sleep=False, seed=0)
SET_NUM_THREADS = torch.set_num_threads  # torch's own, before any engine starts


def vllm_tiny_model(tokenizer, seed: int = 0):
    return build_tiny_model(tokenizer, hidden_size=64, num_heads=2, max_position_embeddings=256, seed=seed).eval()


def _greedy(max_length: int = 24, end_strings=(), min_length: int = 1, **kw) -> SamplingParams:
    return SamplingParams(use_greedy=True, max_length=max_length, min_length=min_length,
                          end_strings=list(end_strings), **kw)


def _answers(g):
    return g.ids, g.truncated


def _same(a: list, b: list) -> int:
    return sum(x == y for x, y in zip(a, b))


@pytest.fixture(scope="module")
def model(tokenizer):
    return vllm_tiny_model(tokenizer)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """32 chat prompts of different lengths (a system prompt on every third)."""
    out = []
    for i in range(32):
        chat = [{"role": "user", "content": f"What is {i} + {3 * i % 17}?" + " Please." * (i % 4)}]
        if i % 3 == 0:
            chat.insert(0, {"role": "system", "content": "Be brief."})
        text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        out.append(tokenizer.encode(text, add_special_tokens=False))
    return out


def test_an_unsupported_model_is_one_error_naming_the_key(tokenizer):
    # before the module's engine starts: one engine per process at a time
    unsupported = build_tiny_model(tokenizer, max_position_embeddings=256)  # head_dim 8
    backend = VLLMBackend(tokenizer, unsupported, SETTINGS)
    with pytest.raises(ConfigError, match=r"model\.spin\.generation_backend=vllm: .*use model\.spin\."
                                          r"generation_backend=spinlm"):
        backend.sync_weights(unsupported.state_dict)
    assert backend.llm is None and backend.model_dir is None


@pytest.fixture(scope="module")
def engine(tokenizer, model):
    backend = VLLMBackend(tokenizer, model, SETTINGS)
    backend.sync_weights(model.state_dict)
    yield backend
    backend.close()


def test_engine_leaves_threads_rng_and_set_num_threads_alone(engine, model, prompts):
    assert torch.set_num_threads is SET_NUM_THREADS  # vLLM's CPU worker replaces it with a no-op
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    engine.generate(model, prompts[:4], SamplingParams(max_length=8, end_strings=[]), seed=5)
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads


def test_greedy_fp32_answers_match_spinlm_decoder_after_a_push(engine, model, tokenizer, prompts):
    params = _greedy(24, ["<|endoftext|>"])
    ours = engine.generate(model, prompts, params)
    decoder = DecoderBackend(tokenizer, 8).generate(model, prompts, params)
    print(f"tiny model, greedy fp32: {_same(ours.ids, decoder.ids)}/{len(prompts)} answers token-identical")
    assert _same(ours.ids, decoder.ids) >= 0.95 * len(prompts), (ours.ids, decoder.ids)
    assert all(t == u for a, b, t, u in zip(ours.ids, decoder.ids, ours.truncated, decoder.truncated) if a == b)
    assert ours.logps is None and ours.answer_logps is None  # the training stack scores the answers


def test_pushing_changed_weights_changes_the_answers_to_the_new_weights(engine, model, tokenizer, prompts):
    params = _greedy(16)
    # openings of over 64 tokens fill KV blocks the prefix cache keeps: the push must clear them
    opening = tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 3, add_special_tokens=False)
    prompts = [opening + p for p in prompts]
    before = engine.generate(model, prompts, params)
    other = vllm_tiny_model(tokenizer, seed=1)
    try:
        engine.sync_weights(other.state_dict)
        after = engine.generate(other, prompts, params)
    finally:
        engine.sync_weights(model.state_dict)
    assert _same(after.ids, before.ids) < len(prompts) // 2
    expected = DecoderBackend(tokenizer, 8).generate(other, prompts, params)
    assert _same(after.ids, expected.ids) >= 0.95 * len(prompts)
    assert engine.generate(model, prompts, params).ids == before.ids  # pushed back: the old answers


def test_each_prompt_is_sampled_from_its_own_seed_whatever_the_batch(engine, model, tokenizer, prompts):
    params = SamplingParams(max_length=16, end_strings=[], temperature=1.0)
    full = engine.generate(model, prompts, params, seed=3)
    assert engine.generate(model, prompts, params, seed=3) == full
    assert _same(engine.generate(model, prompts, params, seed=4).ids, full.ids) < len(prompts) // 2
    stop = StopRule(tokenizer, params.end_strings)
    for i in (0, 7, 31):  # alone in the engine, with the seed it had among all 32
        out = engine._run([prompts[i]], [sampling_params(params, stop, sub_seed(3, i))], False)[0]
        assert stop.cut(list(out.outputs[0].token_ids))[0] == full.ids[i]


def test_stop_ids_and_stop_strings_cut_as_the_decoder_cuts(engine, model, tokenizer, prompts):
    decoder = DecoderBackend(tokenizer, 8)
    free = engine.generate(model, prompts[:1], _greedy(12)).ids[0]
    stop_token = tokenizer.convert_ids_to_tokens(free[3])
    got = engine.generate(model, prompts[:1], _greedy(12, [stop_token]))
    assert got.ids == [free[: free.index(free[3]) + 1]] and got.truncated == [False]
    assert _answers(got) == _answers(decoder.generate(model, prompts[:1], _greedy(12, [stop_token])))

    free = engine.generate(model, prompts[1:2], _greedy(12)).ids[0]
    end = tokenizer.decode(free[2:4])
    assert len(tokenizer.encode(end, add_special_tokens=False)) > 1, "pick another position"
    got = engine.generate(model, prompts[1:2], _greedy(12, [end]))
    assert got.truncated == [False] and got.ids[0] == free[: len(got.ids[0])]
    assert end in tokenizer.decode(got.ids[0]) and end not in tokenizer.decode(got.ids[0][:-1])
    assert _answers(got) == _answers(decoder.generate(model, prompts[1:2], _greedy(12, [end])))
    raw = engine._run([prompts[1]], [sampling_params(_greedy(12, [end]), StopRule(tokenizer, [end]), None)], False)
    assert list(raw[0].outputs[0].token_ids) == got.ids[0] and raw[0].outputs[0].finish_reason == "stop"  # the engine stopped


def test_truncated_flag_and_min_length_as_the_decoder(engine, model, tokenizer, prompts):
    decoder = DecoderBackend(tokenizer, 8)
    short = engine.generate(model, prompts, _greedy(4))
    assert _answers(short) == _answers(decoder.generate(model, prompts, _greedy(4)))
    assert all(n <= 4 for n in short.lengths) and short.num_truncated > 0
    assert all(t == (ids[-1] != tokenizer.eos_token_id and len(ids) == 4) for ids, t in zip(short.ids, short.truncated))

    first = engine.generate(model, prompts[:1], _greedy(8)).ids[0][0]
    stop = [tokenizer.convert_ids_to_tokens(first)]
    assert engine.generate(model, prompts[:1], _greedy(8, stop, min_length=0)).ids == [[first]]
    late = engine.generate(model, prompts[:1], _greedy(8, stop, min_length=3))
    assert late.lengths[0] >= 3 and first not in late.ids[0][:3]
    assert _answers(late) == _answers(decoder.generate(model, prompts[:1], _greedy(8, stop, min_length=3)))


def test_top_k_top_p_and_repetition_penalty_map_as_the_decoder(engine, model, tokenizer, prompts):
    greedy = engine.generate(model, prompts, _greedy(12)).ids
    assert engine.generate(model, prompts, SamplingParams(max_length=12, end_strings=[], top_k=1), seed=1).ids == greedy
    assert engine.generate(model, prompts, SamplingParams(max_length=12, end_strings=[], top_p=1e-6), seed=1).ids \
        == greedy
    penalised = _greedy(12, repetition_penalty=1.5)
    ours = engine.generate(model, prompts, penalised).ids
    assert _same(ours, greedy) < len(prompts)  # the penalty changes answers
    assert _same(ours, DecoderBackend(tokenizer, 8).generate(model, prompts, penalised).ids) >= 0.95 * len(prompts)


def test_every_sampling_field_is_explicit(tokenizer):
    stop = StopRule(tokenizer, ["<|endoftext|>", "ab cd"])
    params = SamplingParams(temperature=0.7, top_k=0, top_p=0.9, repetition_penalty=1.2, max_length=30, min_length=2,
                            end_strings=["<|endoftext|>", "ab cd"])
    sp = sampling_params(params, stop, seed=11)
    assert (sp.temperature, sp.top_k, sp.top_p, sp.min_p, sp.repetition_penalty) == (0.7, 0, 0.9, 0.0, 1.2)
    assert (sp.max_tokens, sp.min_tokens, sp.seed, sp.n) == (30, 2, 11, 1)
    assert sp.stop_token_ids == stop.ids and sp.stop == ["ab cd"] and sp.include_stop_str_in_output
    assert (sp.presence_penalty, sp.frequency_penalty, sp.ignore_eos, sp.skip_special_tokens) == (0, 0, False, False)
    greedy = sampling_params(SamplingParams(use_greedy=True, temperature=0.7, top_k=5, top_p=0.5), stop, None)
    assert (greedy.temperature, greedy.top_k, greedy.top_p) == (0.0, 0, 1.0)


def test_settings_from_config_fill_the_cpu_defaults(monkeypatch):
    from spinlm.config import load_config

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    cfg = load_config(["model.encoder_seq_length=128", "trainer.precision=32"])
    s = EngineSettings.from_config(cfg, torch.device("cpu"))
    assert (s.dtype, s.max_model_len, s.enforce_eager, s.sleep, s.kv_cache_bytes) == ("float32", 128, True, False, 2**30)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    cfg.model.spin.vllm.enable_sleep_mode = True
    assert EngineSettings.from_config(cfg, torch.device("cpu")).kv_cache_bytes == 2 * 2**30
    s = EngineSettings.from_config(cfg, torch.device("cuda", 0))
    assert (s.enforce_eager, s.sleep, s.kv_cache_bytes) == (False, True, None)
