"""Each input form of model.data.*_ds.file_path on the tiny model: the checks before the weights load
turn it into the very samples of the JSONL form; a run trains on parquet and save_to_disk data; the
SPIN paper's real/generated rows, with iteration 0's opponent answers from the data and a resume;
bad sources through the CLI, one line each, exit 2, nothing written. Needs `datasets` (spinlm[data])."""

import json
import logging

import pytest
import torch
from conftest import cache_hub_dataset, crash_at_step

from spinlm import cli
from spinlm.algorithms import spin as spin_module
from spinlm.config import load_config
from spinlm.preflight import prepare
from spinlm.train import build_trainer

pytest.importorskip("datasets")


def cfg_for(run_dir, model_dir, train, val, *overrides):
    return load_config([
        f"pretrained_checkpoint.restore_from_path={model_dir}", f"model.data.train_ds.file_path={train}",
        f"model.data.validation_ds.file_path={val}", f"exp_manager.explicit_log_dir={run_dir}",
        "trainer.precision=32", "model.global_batch_size=4", "model.micro_batch_size=2",
        "model.encoder_seq_length=128", "model.spin.length_params.max_length=24", *overrides,
    ])


def samples(dataset):
    return [(s["prompt_ids"], s["answer_ids"]) for s in dataset]


def jsonl_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_input_form_gives_the_samples_of_its_jsonl(tmp_path, tiny_model_dir, chat_files, hf_datasets):
    train, val = chat_files
    expected = samples(prepare(cfg_for(tmp_path / "run", tiny_model_dir, train, val)).train)
    ds = hf_datasets.Dataset.from_list(jsonl_rows(train))  # NeMo rows: system, mask, conversations
    ds.to_parquet(str(tmp_path / "train.parquet"))
    ds.save_to_disk(str(tmp_path / "disk"))
    hf_datasets.DatasetDict({"train": ds, "other": ds.select(range(4))}).save_to_disk(str(tmp_path / "dict"))
    (tmp_path / "train.json").write_text(json.dumps(jsonl_rows(train)))
    cache_hub_dataset(hf_datasets, "acme/tiny_chat", {"train_sft": jsonl_rows(train)}, tmp_path)
    forms = {
        "parquet": [tmp_path / "train.parquet"], "arrow": [next((tmp_path / "disk").glob("*.arrow"))],
        "json": [tmp_path / "train.json"], "save_to_disk": [tmp_path / "disk"],
        "save_to_disk_dict": [tmp_path / "dict", "model.data.train_ds.split=train"],
        "hub_id": ["acme/tiny_chat", "model.data.train_ds.split=train_sft"],
    }
    for name, (location, *overrides) in forms.items():
        prep = prepare(cfg_for(tmp_path / "run", tiny_model_dir, location, val, *overrides))
        assert samples(prep.train) == expected, name
    assert not (tmp_path / "run").exists()


def _run_args(run_dir, model_dir, train, val, *extra):
    return [f"pretrained_checkpoint.restore_from_path={model_dir}", f"model.data.train_ds.file_path={train}",
            f"model.data.validation_ds.file_path={val}", f"exp_manager.explicit_log_dir={run_dir}",
            "trainer.precision=32", "trainer.spin.max_iterations=1", "trainer.spin.limit_train_batches=2",
            "model.global_batch_size=4", "model.micro_batch_size=2", "model.encoder_seq_length=128",
            "model.spin.length_params.max_length=16", "model.optim.sched.name=Constant", *extra]


# ----- the SPIN paper's real/generated rows ---------------------------------------------------
def paper_rows(n=16):
    rows = []
    for i in range(n):
        a, b = i % 7, i % 5
        question = {"role": "user", "content": f"What is {a} + {b}?"}
        rows.append({"real": [question, {"role": "assistant", "content": f"{a} + {b} = {a + b}."}],
                     "generated": [question, {"role": "assistant", "content": "I think it is seven." * (1 + i % 9)}]})
    return rows


@pytest.fixture
def paper_files(tmp_path, hf_datasets):
    """Training rows in parquet; validation rows as the test split of a save_to_disk DatasetDict."""
    hf_datasets.Dataset.from_list(paper_rows()).to_parquet(str(tmp_path / "spin_iter0.parquet"))
    splits = {"train": paper_rows(4), "test": paper_rows(8)}
    hf_datasets.DatasetDict({k: hf_datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(
        str(tmp_path / "spin_iter0_dict"))
    return tmp_path / "spin_iter0.parquet", tmp_path / "spin_iter0_dict"


def paper_cfg(tmp_path, model_dir, files, run_name, *overrides):
    return cfg_for(tmp_path / run_name, model_dir, *files, "model.data.validation_ds.split=test",
                   "trainer.spin.max_epochs=1",
                   "trainer.spin.limit_train_batches=2", "trainer.spin.save_interval=1",
                   "trainer.spin.val_check_interval=1", "model.optim.lr=1e-3", "model.optim.sched.name=Constant",
                   "model.spin.first_opponent_from_data=true", *overrides)


def test_paper_rows_give_iteration_0_its_opponent_answers(tmp_path, tiny_model_dir, paper_files, monkeypatch, caplog):
    trainer = build_trainer(paper_cfg(tmp_path, tiny_model_dir, paper_files, "run", "trainer.spin.max_iterations=2"))
    real_generate = trainer.generator.generate
    generations = []
    monkeypatch.setattr(trainer.generator, "generate",
                        lambda *a, **k: (generations.append(1), real_generate(*a, **k))[1])
    data_answers = {i: trainer.train_dataset.opponent_answer(i) for i in range(len(trainer.train_dataset))}
    with caplog.at_level(logging.INFO, logger="spinlm"):
        rollouts = trainer._rollouts_for(0, 0)
    assert "the training data's 'generated' answers (model.spin.first_opponent_from_data=true)" in caplog.text
    assert generations == []
    assert {i: (r.generated_ids, r.truncated) for i, r in rollouts.items()} == {i: data_answers[i] for i in rollouts}
    assert any(r.truncated for r in rollouts.values())  # long answers cut to max_length (24), as sampling would
    assert all(len(r.generated_ids) <= 24 for r in rollouts.values())
    # their reference log-probs are the reference's, as for generated answers
    indices = sorted(rollouts)[:4]
    batch = trainer._pair_batch([(0, i) for i in indices], {(0, i): r for i, r in rollouts.items()})
    expected = trainer.reference.logprobs(batch["generated"], batch["generated_mask"])
    assert torch.allclose(batch["ref_policy_log_probs_generated"], expected, atol=1e-4)
    stored = [json.loads(line) for line in (tmp_path / "run" / "rollouts" / "iter_0.jsonl").read_text().splitlines()]
    assert [row["generated_ids"] for row in stored] == [rollouts[i].generated_ids for i in sorted(rollouts)]

    trainer._rollouts_for(1, 0)
    assert generations == [1]  # iteration 1 samples its own answers


def test_paper_rows_resume_matches_an_uninterrupted_run(tmp_path, tiny_model_dir, paper_files, monkeypatch):
    full = build_trainer(paper_cfg(tmp_path, tiny_model_dir, paper_files, "full", "trainer.spin.max_iterations=1"))
    full.fit()
    cfg = paper_cfg(tmp_path, tiny_model_dir, paper_files, "crashy", "trainer.spin.max_iterations=1")
    crash_at_step(build_trainer(cfg), 1, monkeypatch)
    monkeypatch.setattr(spin_module, "opponent_answers_from_data",
                        lambda *a: pytest.fail("iteration 0's stored answers were not reused"))
    resumed = build_trainer(cfg)
    assert resumed.step == 1
    resumed.fit()
    weights = [torch.cat([p.detach().flatten() for p in t.policy.parameters()]) for t in (resumed, full)]
    assert torch.equal(*weights)


# ----- bad sources through the CLI: one line, exit 2, nothing written -------------------------
BAD_SOURCES = {
    "missing_column": ([{"prompt": "Hi", "response": "Hello"}] * 8,
                       "train.parquet: no conversation column: expected one of 'conversations', 'messages', 'real' "
                       "(columns: prompt, response); set model.data.train_ds.conversation_column"),
    "wrong_types": ([{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}] * 5
                    + [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}]}] * 3,
                    "train.parquet: row 5, column 'messages': messages[1]: content must be a string, got NoneType"),
    "generated_not_a_list": ([{"real": paper_rows(1)[0]["real"], "generated": "seven"}] * 8,
                             "train.parquet: row 0, column 'generated': 'generated' must be a list, got str"),
}


@pytest.mark.parametrize("rows, message", list(BAD_SOURCES.values()), ids=list(BAD_SOURCES))
def test_bad_source_is_one_line(tmp_path, tiny_model_dir, chat_files, hf_datasets, capsys, rows, message):
    hf_datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "train.parquet"))
    _assert_refused(capsys, tmp_path, tiny_model_dir, tmp_path / "train.parquet", chat_files[1], message)


def test_bad_held_out_row_is_one_line(tmp_path, tiny_model_dir, chat_files, hf_datasets, capsys):
    rows = jsonl_rows(chat_files[1])[:3] + [{"messages": [{"role": "user", "content": "no answer"}]}]
    hf_datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "test.parquet"))
    _assert_refused(capsys, tmp_path, tiny_model_dir, *chat_files,
                    "test.parquet: row 3, column 'messages': no final assistant turn",
                    f"model.data.test_ds.file_path={tmp_path / 'test.parquet'}")


def test_empty_split_is_one_line(tmp_path, tiny_model_dir, chat_files, hf_datasets, capsys):
    ds = hf_datasets.Dataset.from_list(jsonl_rows(chat_files[0]))
    hf_datasets.DatasetDict({"train": ds, "test": ds.select([])}).save_to_disk(str(tmp_path / "dict"))
    _assert_refused(capsys, tmp_path, tiny_model_dir, chat_files[0], tmp_path / "dict",
                    "dict (split test): no rows (an empty split or file)", "model.data.validation_ds.split=test")


def test_hub_id_not_cached_is_one_line(tmp_path, tiny_model_dir, chat_files, hf_datasets, capsys):
    _assert_refused(capsys, tmp_path, tiny_model_dir, "HuggingFaceH4/ultrachat_200k", chat_files[1],
                    "HuggingFaceH4/ultrachat_200k: not a local file or directory, and this hub dataset is not in the "
                    "local datasets cache", "model.data.train_ds.split=train_sft")


def test_first_opponent_from_data_needs_generated_answers(tmp_path, tiny_model_dir, chat_files, capsys):
    _assert_refused(capsys, tmp_path, tiny_model_dir, *chat_files,
                    "train.jsonl:1: no 'generated' answer (SPIN paper format), but "
                    "model.spin.first_opponent_from_data=true", "model.spin.first_opponent_from_data=true")


def _assert_refused(capsys, tmp_path, model_dir, train, val, message, *extra):
    run_dir = tmp_path / "refused"
    logging.getLogger().handlers.clear()  # an earlier in-process CLI run's handler holds a closed stream
    code = cli.main(["train", *_run_args(run_dir, model_dir, train, val, *extra)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("spinlm: error:")]
    assert code == 2 and len(lines) == 1, err[-2000:]
    assert message in lines[0], lines[0]
    assert "Traceback" not in err and not run_dir.exists()
