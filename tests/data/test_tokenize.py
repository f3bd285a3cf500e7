"""Batched, multi-process and cached tokenization gives exactly `ChatRenderer.render`'s ids."""

import copy
import logging
import random
from dataclasses import replace

import pytest
from safetensors.numpy import load_file

from spinlm.data import tokenize as tokenize_module
from spinlm.data.chat import Conversation, Turn
from spinlm.data.render import ChatRenderer
from spinlm.data.tokenize import default_workers, tokenize_conversations

NEMO_TOKENS = {"system_turn_start": "<|endoftext|>", "turn_start": "<|im_start|>", "label_start": "<|im_end|>",
               "end_of_turn": "\n", "end_of_name": "\n"}
WORDS = "the quick brown fox jumps over lazy dog what is answer café 12 + 7 = 19 déjà vu !".split()


def conversations(n: int, seed: int = 0) -> list[Conversation]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        turns = []
        for _ in range(rng.randint(1, 3)):
            turns += [Turn("user", " ".join(rng.choices(WORDS, k=rng.randint(1, 12)))),
                      Turn("assistant", " ".join(rng.choices(WORDS, k=rng.randint(1, 20))))]
        generated = "" if i % 5 == 0 else " ".join(rng.choices(WORDS, k=rng.randint(1, 15)))
        out.append(Conversation(tuple(turns), system="Be brief." if i % 3 == 0 else None, generated=generated))
    return out


@pytest.fixture(params=["template", "nemo"])
def renderer(request, tokenizer):
    return ChatRenderer(tokenizer, NEMO_TOKENS if request.param == "nemo" else None)


def expected_ids(renderer, convs):
    generated = [renderer.render(replace(c, turns=c.turns[:-1] + (Turn("assistant", c.generated),)))[1] for c in convs]
    return [renderer.render(c) for c in convs], generated


def as_lists(tokens, part):
    return [tokens.get(part, i).tolist() for i in range(len(tokens))]


def test_equals_render_for_prompt_answer_and_generated(renderer, monkeypatch):
    monkeypatch.setattr(tokenize_module, "CHUNK", 7)  # several batches, one of them partial
    convs = conversations(40)
    pairs, generated = expected_ids(renderer, convs)
    tokens = tokenize_conversations(convs, renderer, with_generated=True, show_progress=False)
    assert as_lists(tokens, "prompt") == [p for p, _ in pairs]
    assert as_lists(tokens, "answer") == [a for _, a in pairs]
    assert as_lists(tokens, "generated") == generated
    assert tokenize_conversations(convs[:3], renderer).get("generated", 0) is None


def test_worker_processes_give_the_same_ids(renderer, monkeypatch):
    monkeypatch.setattr(tokenize_module, "CHUNK", 5)
    convs = conversations(33, seed=1)
    one = tokenize_conversations(convs, renderer, workers=1, with_generated=True, show_progress=False)
    two = tokenize_conversations(convs, renderer, workers=2, with_generated=True, show_progress=False)
    for part in ("prompt", "answer", "generated"):
        assert (one.ids[part] == two.ids[part]).all() and (one.offsets[part] == two.offsets[part]).all()


def test_cache_is_written_then_read_without_rendering(renderer, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(tokenize_module, "CACHE_MIN", 10)
    convs = conversations(20)
    first = tokenize_conversations(convs, renderer, cache_dir=tmp_path, with_generated=True, show_progress=False)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    parts = ("prompt", "answer", "generated")
    assert set(load_file(str(files[0]))) == {f"{p}_{k}" for p in parts for k in ("ids", "offsets")}

    monkeypatch.setattr(type(renderer), "render_batch", lambda *a: pytest.fail("rendered again despite the cache"))
    with caplog.at_level(logging.INFO, logger="spinlm.data.tokenize"):
        again = tokenize_conversations(convs, renderer, cache_dir=tmp_path, with_generated=True, show_progress=False)
    assert "read from the cache" in caplog.text
    for part in ("prompt", "answer", "generated"):
        assert as_lists(again, part) == as_lists(first, part)


def test_cache_key_follows_content_tokenizer_and_render_settings(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(tokenize_module, "CACHE_MIN", 10)
    convs = conversations(12)
    template = ChatRenderer(tokenizer)

    def key(renderer, data, with_generated=False):
        return tokenize_module._cache_path(data, renderer, tmp_path, with_generated).name

    base = key(template, convs)
    assert key(template, list(convs)) == base
    edited = convs[:5] + [replace(convs[5], turns=convs[5].turns[:-1] + (Turn("assistant", "changed"),))] + convs[6:]
    assert key(template, edited) != base
    assert key(template, [replace(convs[0], system="other")] + convs[1:]) != base
    assert key(template, convs, with_generated=True) != base
    assert key(ChatRenderer(tokenizer, NEMO_TOKENS), convs) != base
    changed = copy.deepcopy(tokenizer)  # another template, or another vocabulary, renders differently
    changed.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert key(ChatRenderer(changed), convs) != base
    added = copy.deepcopy(tokenizer)
    added.add_tokens(["<new>"])
    assert key(ChatRenderer(added), convs) != base
    assert tokenize_module._cache_path(convs[:9], template, tmp_path, False) is None  # below CACHE_MIN


def test_corrupt_cache_is_ignored_and_rewritten(renderer, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(tokenize_module, "CACHE_MIN", 10)
    convs = conversations(15)
    good = tokenize_conversations(convs, renderer, cache_dir=tmp_path, show_progress=False)
    path = next(tmp_path.glob("*.safetensors"))
    path.write_bytes(path.read_bytes()[:40])
    with caplog.at_level(logging.WARNING):
        again = tokenize_conversations(convs, renderer, cache_dir=tmp_path, show_progress=False)
    assert "unusable token cache" in caplog.text
    assert as_lists(again, "answer") == as_lists(good, "answer")
    assert len(load_file(str(path))["answer_offsets"]) == 16  # rewritten whole


def test_default_workers_only_for_large_sets(monkeypatch):
    monkeypatch.setattr(tokenize_module.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert default_workers(tokenize_module.PARALLEL_MIN - 1) == 1
    assert default_workers(tokenize_module.PARALLEL_MIN) == 4
    assert default_workers(10**6, processes_per_node=2) == 2
    assert default_workers(10**6, processes_per_node=8) == 1
