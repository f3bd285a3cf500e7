import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import logging
from pathlib import Path

import pytest

from spinlm.data.chat import Conversation
from spinlm.data.dataset import SPINDataset, build_dataset, fit_to_length, subsample
from spinlm.data.render import ChatRenderer
from spinlm.errors import ConfigError, DataError
from spinlm.model.tiny import build_tiny_tokenizer

NEMO_FILE = Path(__file__).resolve().parents[2] / "examples" / "data" / "nemo_dummy_sft.jsonl"


class LengthRenderer:
    """Renders 'P,A' (user content, e.g. '5,3') to prompt ids 0..P-1 and answer ids 100..100+A-1."""

    def render(self, conv: Conversation) -> tuple[list[int], list[int]]:
        p, a = map(int, conv.turns[0].content.split(","))
        return list(range(p)), list(range(100, 100 + a))

    def render_batch(self, convs):
        pairs = [self.render(c) for c in convs]
        return [p for p, _ in pairs], [a for _, a in pairs]


def lengths_file(tmp_path: Path, *pairs: tuple[int, int]) -> Path:
    path = tmp_path / "lens.jsonl"
    lines = [
        json.dumps({"conversations": [{"from": "User", "value": f"{p},{a}"}, {"from": "Assistant", "value": "x"}]})
        for p, a in pairs
    ]
    path.write_text("\n".join(lines))
    return path


def test_truncate_keeps_the_prompt_end_and_cuts_the_answer():
    prompt, answer, prompt_cut, answer_cut = fit_to_length(list(range(10)), [7] * 8, 12, 6, "truncate")
    assert prompt == [4, 5, 6, 7, 8, 9]
    assert answer == [7] * 6
    assert (prompt_cut, answer_cut) == (True, True)


def test_fitting_sample_is_unchanged():
    assert fit_to_length([1, 2], [3, 4], 4, 2, "drop") == ([1, 2], [3, 4], False, False)


@pytest.mark.parametrize("prompt_len, answer_len", [(7, 1), (3, 10)])
def test_drop_policy_drops_what_would_be_cut(prompt_len, answer_len):
    assert fit_to_length([1] * prompt_len, [2] * answer_len, 10, 6, "drop") is None


def test_empty_answer_is_dropped():
    assert fit_to_length([1], [], 10, 6, "truncate") is None


@pytest.mark.parametrize(
    "policy, expected",
    [
        # (kept, prompt_truncated, answer_truncated, dropped)
        ("truncate", (4, 2, 2, 0)),
        ("drop", (1, 0, 0, 3)),
    ],
)
def test_build_dataset_counts(tmp_path, policy, expected):
    path = lengths_file(tmp_path, (3, 3), (9, 2), (4, 20), (8, 8))
    ds = build_dataset(path, LengthRenderer(), max_seq_length=10, max_prompt_length=6, policy=policy)
    r = ds.report
    assert (r.total, (r.kept, r.prompt_truncated, r.answer_truncated, r.dropped)) == (4, expected)
    assert len(ds) == r.kept
    assert all(len(s["prompt_ids"]) <= 6 and len(s["prompt_ids"]) + len(s["answer_ids"]) <= 10 for s in ds)
    if policy == "truncate":
        assert ds[1]["prompt_ids"] == [3, 4, 5, 6, 7, 8]  # kept the end
        assert ds[2]["answer_ids"] == list(range(100, 106))


def test_items_are_indexed_and_limit_applies(tmp_path):
    path = lengths_file(tmp_path, (1, 1), (2, 2), (3, 3))
    ds = build_dataset(path, LengthRenderer(), 10, 6, limit=2)
    assert [ds[i] for i in range(len(ds))] == [
        {"prompt_ids": [0], "answer_ids": [100], "index": 0},
        {"prompt_ids": [0, 1], "answer_ids": [100, 101], "index": 1},
    ]


def test_no_survivor_names_the_file(tmp_path):
    path = lengths_file(tmp_path, (9, 1), (1, 20))
    with pytest.raises(DataError, match=r"lens\.jsonl.*no sample survives"):
        build_dataset(path, LengthRenderer(), 10, 6, policy="drop")


@pytest.mark.parametrize(
    "max_seq, max_prompt, policy, problem",
    [(10, 10, "truncate", "must be <"), (0, -1, "truncate", "must be > 0"), (10, 5, "pad", "unknown length policy")],
)
def test_invalid_limits(tmp_path, max_seq, max_prompt, policy, problem):
    with pytest.raises(ConfigError, match=problem):
        build_dataset(lengths_file(tmp_path, (1, 1)), LengthRenderer(), max_seq, max_prompt, policy)


def test_real_nemo_file_within_limits_and_reported(caplog):
    renderer = ChatRenderer(build_tiny_tokenizer())
    with caplog.at_level(logging.INFO, logger="spinlm.data.dataset"):
        ds = build_dataset(NEMO_FILE, renderer, max_seq_length=256, max_prompt_length=128)
    r = ds.report
    assert r.total == r.kept == len(ds) == 30
    assert r.prompt_truncated > 0 and r.answer_truncated > 0 and r.dropped == 0
    for item in ds:
        assert 0 < len(item["prompt_ids"]) <= 128
        assert len(item["prompt_ids"]) + len(item["answer_ids"]) <= 256
    assert r.summary() in caplog.text
    assert f"30 samples, 30 kept: {r.prompt_truncated} prompts cut (kept the end)" in r.summary()
    assert "max_seq_length=256, max_prompt_length=128" in r.summary()


def make_dataset(n: int) -> SPINDataset:
    return SPINDataset([{"prompt_ids": [i], "answer_ids": [i + 100]} for i in range(n)])


@pytest.mark.parametrize("num_samples", [3, 5, 12])
def test_subsample_is_deterministic_and_reindexed(num_samples):
    ds = make_dataset(5)
    a, b = subsample(ds, num_samples, seed=1), subsample(ds, num_samples, seed=1)
    items = [a[i] for i in range(len(a))]
    assert items == [b[i] for i in range(len(b))]
    assert len(a) == num_samples
    assert [it["index"] for it in items] == list(range(num_samples))
    counts = [sum(it["prompt_ids"] == [k] for it in items) for k in range(5)]
    assert max(counts) - min(counts) <= 1  # repeats evenly when num_samples > len


def test_subsample_seed_matters():
    ds = make_dataset(20)
    first = lambda d: [d[i]["prompt_ids"][0] for i in range(len(d))]  # noqa: E731
    assert first(subsample(ds, 10, seed=0)) != first(subsample(ds, 10, seed=1))


def test_turn_masks_follow_a_prompt_cut_from_the_left(tmp_path, tokenizer):
    from spinlm.data.render import ChatRenderer

    path = tmp_path / "multi.jsonl"
    path.write_text(json.dumps({"messages": [
        {"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "How can I help you today?"},
        {"role": "user", "content": "What is 12 + 7?"}, {"role": "assistant", "content": "19."}]}) + "\n")
    renderer = ChatRenderer(tokenizer)
    full = build_dataset(path, renderer, 200, 150, turn_masks=True)[0]
    cut = build_dataset(path, renderer, 200, len(full["prompt_ids"]) - 3, turn_masks=True)[0]
    assert len(full["prompt_mask"]) == len(full["prompt_ids"]) and any(full["prompt_mask"])
    assert cut["prompt_mask"] == full["prompt_mask"][3:] and cut["prompt_ids"] == full["prompt_ids"][3:]
    assert "prompt_mask" not in build_dataset(path, renderer, 200, 150)[0]
