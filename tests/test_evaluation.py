import json

import pytest
import torch

from spinlm.data.collate import spin_custom_collate
from spinlm.data.render import ChatRenderer
from spinlm.data.tasks import write_task
from spinlm.evaluation import HeldOutEvaluator, evaluate, load_eval_items, load_model_for_eval
from spinlm.model.generation import Generations
from spinlm.model.logprobs import masked_mean_nll


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    paths = write_task(tmp_path_factory.mktemp("task"), {"train": 4, "validation": 4, "test": 6}, seed=0)
    model, tokenizer = load_model_for_eval(tiny_model_dir)
    renderer = ChatRenderer(tokenizer)
    items = load_eval_items(paths["test"], renderer, max_seq_length=256, max_new_tokens=8)
    return model, tokenizer, renderer, items, paths


def test_items_keep_prompt_answer_and_skill(setup):
    _, tokenizer, _, items, paths = setup
    records = [json.loads(line) for line in paths["test"].read_text().splitlines()]
    assert [it.skill for it in items] == [r["skill"] for r in records]
    assert [it.expected for it in items] == [r["messages"][-1]["content"] for r in records]
    assert tokenizer.decode(items[0].answer_ids).startswith(records[0]["messages"][-1]["content"])


def test_evaluate_tiny_model_sft_loss_is_the_token_mean_nll(setup):
    model, tokenizer, renderer, items, _ = setup
    result = evaluate(model, tokenizer, items, renderer.end_strings, max_new_tokens=8, batch_size=4,
                      show_progress=False)
    b = spin_custom_collate([{"prompt_ids": it.prompt_ids, "answer_ids": it.answer_ids} for it in items],
                            tokenizer.eos_token_id)
    with torch.no_grad():
        expected = masked_mean_nll(model, b["prompts_and_answers"], b["masks"]).item()
    assert result.sft_loss == pytest.approx(expected, rel=1e-5)
    assert len(result.records) == len(items)


def test_accuracy_counts_replies_whose_answer_matches(setup, monkeypatch):
    model, tokenizer, renderer, items, _ = setup
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    # the first half replies with the ground truth in other words, the rest with a wrong number
    replies = [f"Sure. the answer is {it.expected.split('The answer is ')[-1]}" if i < 3 else "It is 100001."
               for i, it in enumerate(items)]
    fake = Generations(ids=[enc(r) for r in replies], truncated=[False] * len(items))
    monkeypatch.setattr("spinlm.evaluation.generate", lambda *a, **k: fake)
    result = evaluate(model, tokenizer, items, renderer.end_strings, show_progress=False)
    assert result.accuracy == pytest.approx(0.5)
    assert result.answer_style == pytest.approx(0.5)
    assert [r["correct"] for r in result.records] == [True] * 3 + [False] * 3
    assert sum(c for c, _ in result.by_skill().values()) == 3


def test_held_out_evaluator_writes_answers_and_metrics(setup, tmp_path):
    model, tokenizer, renderer, items, _ = setup
    evaluator = HeldOutEvaluator(items, tokenizer, renderer.end_strings, max_new_tokens=4, batch_size=8,
                                 out_dir=tmp_path / "eval")
    metrics = evaluator(model, 2)
    assert set(metrics) >= {"eval/accuracy", "eval/sft_loss", "timing/eval_s", "eval/iteration"}
    assert metrics["eval/iteration"] == 2
    rows = (tmp_path / "eval" / "iter_2.jsonl").read_text().splitlines()
    assert len(rows) == len(items) and "reply" in json.loads(rows[0])
