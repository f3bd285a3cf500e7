import json

import pytest
import torch

from spinlm.data.collate import spin_custom_collate
from spinlm.data.render import ChatRenderer
from spinlm.data.tasks import write_task
from spinlm.evaluation import HeldOutEvaluator, evaluate, load_eval_items, load_model_for_eval
from spinlm.model.generation import Generations
from spinlm.model.logprobs import masked_mean_nll
from spinlm.utils.checkpoint import Checkpointer


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


def test_answers_scored_in_the_decoding_pass_give_the_same_result(setup, monkeypatch):
    model, tokenizer, renderer, items, _ = setup
    args = (model, tokenizer, items, renderer.end_strings, 8, 4)
    separate = evaluate(*args, show_progress=False, loss_in_decoding=False)
    monkeypatch.setattr("spinlm.evaluation.answer_nll_sharded", lambda *a, **k: pytest.fail("a second pass ran"))
    fast = evaluate(*args, show_progress=False)
    assert [r["reply"] for r in fast.records] == [r["reply"] for r in separate.records]
    assert fast.accuracy == separate.accuracy
    assert fast.sft_loss == pytest.approx(separate.sft_loss, rel=1e-6)


def test_accuracy_counts_replies_whose_answer_matches(setup, monkeypatch):
    model, tokenizer, renderer, items, _ = setup
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    # the first half replies with the ground truth in other words, the rest with a wrong number
    replies = [f"Sure. the answer is {it.expected.split('The answer is ')[-1]}" if i < 3 else "It is 100001."
               for i, it in enumerate(items)]
    fake = Generations(ids=[enc(r) for r in replies], truncated=[False] * len(items))
    monkeypatch.setattr("spinlm.evaluation.DecoderBackend.generate", lambda *a, **k: fake)
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


# ----- in the trainer -------------------------------------------------------------------
def heldout_config(paths, model_dir, run_dir, *extra):
    from spinlm.config import load_config

    return load_config([
        f"pretrained_checkpoint.restore_from_path={model_dir}",
        f"model.data.train_ds.file_path={paths['train']}", f"model.data.validation_ds.file_path={paths['validation']}",
        f"model.data.test_ds.file_path={paths['test']}", f"exp_manager.explicit_log_dir={run_dir}",
        "trainer.precision=32", "trainer.spin.max_iterations=2", "trainer.spin.save_interval=1",
        "trainer.spin.eval_max_new_tokens=6", "model.global_batch_size=2", "model.micro_batch_size=1",
        "model.encoder_seq_length=256", "model.spin.length_params.max_length=8", "model.optim.lr=1e-2",
        "exp_manager.checkpoint_callback_params.save_top_k=10", "exp_manager.name=heldout_run",
        "exp_manager.checkpoint_callback_params.monitor=eval_sft_loss", *extra,
    ])


def test_trainer_evaluates_before_training_and_after_each_iteration(tmp_path, tiny_model_dir, setup):
    from spinlm.train import run

    paths = setup[4]
    run_dir = tmp_path / "run"
    cfg = heldout_config(paths, tiny_model_dir, run_dir)
    run(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/accuracy" in r]
    # 4 train samples / batch 2 = 2 steps an iteration
    assert [(r["step"], r["eval/iteration"]) for r in evals] == [(0, 0), (2, 1), (4, 2)]
    assert all(r["timing/eval_s"] >= 0 for r in evals)
    assert sorted(p.name for p in (run_dir / "eval").iterdir()) == ["iter_0.jsonl", "iter_1.jsonl", "iter_2.jsonl"]
    assert (run_dir / "report.png").is_file() and "| 2 |" in (run_dir / "report.md").read_text()
    assert len({r["eval/sft_loss"] for r in evals}) == 3  # the policy trained in between
    assert (run_dir / "report.md").read_text().startswith(f"# SPIN run report: heldout_run in {run_dir}")

    # the checkpoint at the end of iteration 1 and the final export evaluate as the trainer did
    renderer = setup[2]
    for model_path, expected in ((run_dir / "checkpoints" / "step_000002", evals[1]), (run_dir, evals[2])):
        model, tokenizer = load_model_for_eval(model_path)
        items = load_eval_items(paths["test"], renderer, 256, 6)
        result = evaluate(model, tokenizer, items, renderer.end_strings, max_new_tokens=6, show_progress=False)
        assert result.sft_loss == pytest.approx(expected["eval/sft_loss"], rel=1e-4)
        assert result.accuracy == expected["eval/accuracy"]

    # checkpoints carry the held-out metrics, so monitor=eval_sft_loss keeps the best of them
    states = {p.name: json.loads((p / "trainer_state.json").read_text())
              for p in (run_dir / "checkpoints").glob("step_*")}
    assert states["step_000002"]["eval_sft_loss"] == evals[1]["eval/sft_loss"]
    assert states["step_000004"]["eval_accuracy"] == evals[2]["eval/accuracy"]
    assert "eval_sft_loss" not in states["step_000003"]  # measured on another step's policy: not ranked
    ranked = {name: s["eval_sft_loss"] for name, s in states.items() if "eval_sft_loss" in s}
    assert ranked.keys() == {"step_000002", "step_000004"}  # step 1 comes after the start model's evaluation
    Checkpointer(run_dir / "checkpoints", keep_last=1, monitor="eval_sft_loss", mode="min")._prune()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == sorted(
        {"step_000004", min(ranked, key=ranked.get)})


def test_spinlm_sft_evaluates_held_out_like_spin(tmp_path, tiny_model_dir, setup):
    """`spinlm sft` (no reference) evaluates the start model and each block's policy, as SPIN does."""
    from spinlm.train import run

    run_dir = tmp_path / "sft"
    run(heldout_config(setup[4], tiny_model_dir, run_dir, "trainer.spin.save_interval=100"), sft=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [(r["step"], r["eval/iteration"]) for r in evals] == [(0, 0), (2, 1), (4, 2)]
    assert len({r["eval/sft_loss"] for r in evals}) == 3
    assert evals[-1]["eval/sft_loss"] < evals[0]["eval/sft_loss"]  # the policy trained in between (lr 1e-2)
