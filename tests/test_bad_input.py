"""Bad input of every kind fails before training: one line naming the file:line or key, exit code 2,
no traceback, and no checkpoint written. Run through the CLI entry point in-process (fast)."""

import json
import logging

import pytest

from spinlm import cli

NEMO_TURNS = [{"from": "User", "value": "What is 2 + 2?"}, {"from": "Assistant", "value": "4."}]


def nemo(turns=None, **extra):
    return json.dumps({"system": "", "mask": "User", "conversations": NEMO_TURNS if turns is None else turns, **extra})


def hf(messages):
    return json.dumps({"messages": messages})


GOOD = [nemo([{"from": "User", "value": f"What is {i} + 1?"}, {"from": "Assistant", "value": f"{i + 1}."}])
        for i in range(8)]


@pytest.fixture
def paths(tmp_path, tiny_model_dir):
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(line + "\n" for line in GOOD), encoding="utf-8")
    val.write_text("".join(line + "\n" for line in GOOD[:4]), encoding="utf-8")
    return {"train": train, "val": val, "run": tmp_path / "run", "model": tiny_model_dir, "tmp": tmp_path}


def base_args(p):
    return [
        f"pretrained_checkpoint.restore_from_path={p['model']}",
        f"model.data.train_ds.file_path={p['train']}",
        f"model.data.validation_ds.file_path={p['val']}",
        f"exp_manager.explicit_log_dir={p['run']}",
        "trainer.precision=32", "trainer.spin.max_iterations=1",
        "model.global_batch_size=4", "model.micro_batch_size=2",
        "model.encoder_seq_length=128", "model.spin.length_params.max_length=16",
    ]


def run_cli(args, capsys, monkeypatch):
    monkeypatch.delenv("SPINLM_DEBUG", raising=False)
    logging.getLogger().handlers.clear()
    code = cli.main(["train", *args])
    return code, capsys.readouterr().err


def assert_refused(code, err, message, p):
    assert code == 2, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("spinlm: error:")]
    assert len(lines) == 1, err
    assert message in lines[0], lines[0]
    assert "Traceback" not in err
    assert not list(p["run"].glob("checkpoints/step_*"))
    assert not (p["run"] / "metrics.jsonl").exists()


def write_train(p, lines, raw: bytes | None = None):
    if raw is not None:
        p["train"].write_bytes(raw)
    else:
        p["train"].write_text("".join(line + "\n" for line in lines), encoding="utf-8")


# (records written after the 8 good ones -> they sit on line 9; expected message fragment)
BAD_RECORDS = {
    "not_json": ('{"conversations": [', "train.jsonl:9: not valid JSON"),
    "json_list": ("[1, 2]", "train.jsonl:9: record is a JSON list, expected an object"),
    "json_string": ('"hello"', "train.jsonl:9: record is a JSON str"),
    "no_conversations_or_messages": ('{"system": "", "turns": []}', "train.jsonl:9: record has neither 'conversations'"),
    "both_formats_in_one_record": (json.dumps({"conversations": NEMO_TURNS, "messages": []}),
                                   "train.jsonl:9: record has both 'conversations' and 'messages'"),
    "conversations_not_list": (json.dumps({"conversations": "User: hi"}), "'conversations' must be a list, got str"),
    "no_turns": (nemo([]), "train.jsonl:9: conversation has no turns"),
    "turn_not_object": (nemo(["User: hi", "Assistant: hello"]), "conversations[0]: turn is a JSON str"),
    "turn_missing_value": (nemo([{"from": "User"}, NEMO_TURNS[1]]), "conversations[0]: turn is missing key(s) 'value'"),
    "wrong_role_name": (nemo([{"from": "Human", "value": "hi"}, NEMO_TURNS[1]]),
                        "conversations[0]: unknown role 'Human'"),
    "assistant_first": (nemo([NEMO_TURNS[1], NEMO_TURNS[0]]), "turn 0 is 'assistant' but 'user' was expected"),
    "two_user_turns": (nemo([NEMO_TURNS[0], NEMO_TURNS[0], NEMO_TURNS[1]]), "turn 1 is 'user' but 'assistant'"),
    "no_final_assistant": (nemo([NEMO_TURNS[0], NEMO_TURNS[1], NEMO_TURNS[0]]), "train.jsonl:9: no final assistant turn"),
    "only_user": (nemo([NEMO_TURNS[0]]), "no final assistant turn"),
    "empty_string": (nemo([NEMO_TURNS[0], {"from": "Assistant", "value": ""}]), "conversations[1]: empty content"),
    "whitespace_string": (nemo([{"from": "User", "value": "  \n"}, NEMO_TURNS[1]]), "conversations[0]: empty content"),
    "number_value": (nemo([NEMO_TURNS[0], {"from": "Assistant", "value": 4}]),
                     "conversations[1]: content must be a string, got int"),
    "null_value": (nemo([NEMO_TURNS[0], {"from": "Assistant", "value": None}]), "content must be a string, got NoneType"),
    "non_string_role": (nemo([{"from": 1, "value": "hi"}, NEMO_TURNS[1]]), "conversations[0]: unknown role 1"),
    "non_string_system": (nemo(system=["a"]), "'system' must be a string, got list"),
    "duplicate_key": ('{"conversations": [], "conversations": []}', "train.jsonl:9: key 'conversations' appears twice"),
    "mixed_formats": (hf([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]),
                      "train.jsonl:9: record uses the Hugging Face ('messages') format but line 1 uses the NeMo"),
}


@pytest.mark.parametrize("record, message", list(BAD_RECORDS.values()), ids=list(BAD_RECORDS))
def test_bad_record_is_refused_with_file_and_line(paths, capsys, monkeypatch, record, message):
    write_train(paths, GOOD + [record])
    code, err = run_cli(base_args(paths), capsys, monkeypatch)
    assert_refused(code, err, message, paths)


HF_BAD = {
    "system_in_the_middle": ([{"role": "user", "content": "hi"}, {"role": "system", "content": "x"},
                              {"role": "assistant", "content": "hello"}],
                             "train.jsonl:1: messages[1]: unknown role 'system'"),
    "messages_missing_content": ([{"role": "user"}, {"role": "assistant", "content": "hello"}],
                                 "train.jsonl:1: messages[0]: turn is missing key(s) 'content'"),
    "system_content_not_string": ([{"role": "system", "content": 3}, {"role": "user", "content": "hi"},
                                   {"role": "assistant", "content": "hello"}],
                                  "train.jsonl:1: messages[0]: system content must be a string, got int"),
}


@pytest.mark.parametrize("messages, message", list(HF_BAD.values()), ids=list(HF_BAD))
def test_bad_hf_record(paths, capsys, monkeypatch, messages, message):
    write_train(paths, [hf(messages)])
    code, err = run_cli(base_args(paths), capsys, monkeypatch)
    assert_refused(code, err, message, paths)


FILES = {
    "empty_file": (b"", "train.jsonl:1: file has no records"),
    "blank_lines_only": (b"\n  \n\n", "train.jsonl:1: file has no records"),
    "not_utf8": (("\n".join(GOOD[:2]) + "\n").encode() + b'{"x": "\xff\xfe"}\n', "train.jsonl:3: not valid UTF-8"),
    "latin1_file": ('{"system": "caf\u00e9"}\n'.encode("latin-1"), "train.jsonl:1: not valid UTF-8"),
}


@pytest.mark.parametrize("raw, message", list(FILES.values()), ids=list(FILES))
def test_bad_file(paths, capsys, monkeypatch, raw, message):
    write_train(paths, None, raw=raw)
    code, err = run_cli(base_args(paths), capsys, monkeypatch)
    assert_refused(code, err, message, paths)


def test_bad_validation_file_names_it(paths, capsys, monkeypatch):
    paths["val"].write_text(GOOD[0] + "\n" + nemo([NEMO_TURNS[0]]) + "\n", encoding="utf-8")
    code, err = run_cli(base_args(paths), capsys, monkeypatch)
    assert_refused(code, err, "val.jsonl:2: no final assistant turn", paths)


def test_sample_too_long_under_length_policy_error(paths, capsys, monkeypatch):
    long_answer = nemo([NEMO_TURNS[0], {"from": "Assistant", "value": "word " * 200}])
    write_train(paths, GOOD[:5] + [long_answer] + GOOD[5:])
    code, err = run_cli([*base_args(paths), "model.data.length_policy=error"], capsys, monkeypatch)
    assert_refused(code, err, "train.jsonl:6: sample is", paths)
    assert "longer than max_seq_length 128" in err and "model.data.length_policy=error" in err


def test_prompt_too_long_under_length_policy_error(paths, capsys, monkeypatch):
    long_prompt = nemo([{"from": "User", "value": "word " * 200}, NEMO_TURNS[1]])
    write_train(paths, [long_prompt] + GOOD)
    code, err = run_cli([*base_args(paths), "model.data.length_policy=error"], capsys, monkeypatch)
    assert_refused(code, err, "train.jsonl:1: prompt is", paths)


def test_missing_data_file(paths, capsys, monkeypatch):
    paths["val"].unlink()
    code, err = run_cli(base_args(paths), capsys, monkeypatch)
    assert_refused(code, err, "val.jsonl:0: file not found (model.data.validation_ds.file_path)", paths)


def test_data_path_is_a_directory(paths, capsys, monkeypatch):
    args = [a for a in base_args(paths) if "train_ds.file_path" not in a]
    code, err = run_cli([*args, f"model.data.train_ds.file_path={paths['tmp']}"], capsys, monkeypatch)
    assert_refused(code, err, "is a directory, but not one written by Dataset.save_to_disk", paths)
    assert "(model.data.train_ds.file_path)" in err


def test_fewer_samples_than_a_global_batch(paths, capsys, monkeypatch):
    write_train(paths, GOOD[:3])
    code, err = run_cli(base_args(paths), capsys, monkeypatch)
    assert_refused(code, err, "fewer than model.global_batch_size=4", paths)


CONFIGS = {
    "unknown_key": ("trainer.spin.max_iteratons=2", "unknown key 'trainer.spin.max_iteratons'"),
    "wrong_type": ("model.optim.lr=fast", "'model.optim.lr' must be a number"),
    "wrong_type_bool": ("model.data.shuffle=maybe", "'model.data.train_ds.shuffle'"),
    "negative_lr": ("model.optim.lr=-1e-5", "model.optim.lr must be > 0"),
    "zero_lr": ("model.optim.lr=0.0", "model.optim.lr must be > 0"),
    "gbs_not_divisible": ("model.global_batch_size=5", "model.global_batch_size (5) must be a positive multiple"),
    "empty_kl_schedule": ("model.spin.ref_policy_kl_penalty=[]", "ref_policy_kl_penalty is an empty list"),
    "kl_schedule_too_short": ("trainer.spin.max_iterations=3", "has 2 values but trainer.spin.max_iterations is 3"),
    "bad_max_time": ("trainer.max_time=2h", "trainer.max_time must be 'DD:HH:MM:SS'"),
    "bad_max_time_fields": ("trainer.max_time=00:01:99", "trainer.max_time must be 'DD:HH:MM:SS'"),
    "bad_length_policy": ("model.data.length_policy=pad", "model.data.length_policy must be truncate, drop or error"),
    "generation_longer_than_context": ("model.spin.length_params.max_length=128", "must be below"),
    "seq_longer_than_model_context": ("model.encoder_seq_length=100000", "exceeds the model's context length (256)"),
    "save_top_k_below_minus_one": ("exp_manager.checkpoint_callback_params.save_top_k=-2", "save_top_k must be >= -1"),
    "missing_model": ("pretrained_checkpoint.restore_from_path=/nonexistent/model", "/nonexistent/model does not exist"),
    "repeated_key": ("model.optim.lr=1e-3", "key 'model.optim.lr' is given twice"),
    "limit_fraction_out_of_range": ("trainer.spin.limit_train_batches=1.5", "limit_train_batches as a fraction"),
    "unknown_wandb_key": ("exp_manager.wandb_logger_kwargs.projet=x",
                          "unknown key 'exp_manager.wandb_logger_kwargs.projet' (did you mean "
                          "'exp_manager.wandb_logger_kwargs.project'?"),
    "unknown_mlflow_key": ("++exp_manager.mlflow_logger_kwargs.log_model=true",
                           "unknown key 'exp_manager.mlflow_logger_kwargs.log_model'"),
    "wandb_tags_not_a_list": ("exp_manager.wandb_logger_kwargs.tags=spin", "wandb_logger_kwargs.tags' must be a list"),
    "mlflow_tags_not_a_mapping": ("exp_manager.mlflow_logger_kwargs.tags=[a]", "mlflow_logger_kwargs.tags' must be a"),
    "mlflow_tags_nested": ("exp_manager.mlflow_logger_kwargs.tags={a:[1]}", "tags must map names to plain values"),
    "tensor_parallel": ("++model.tensor_model_parallel_size=2", "model.tensor_model_parallel_size=2 is not supported"),
    # schedules resolved against the run's 2 steps
    "warmup_never_reaches_lr": ("model.optim.sched.warmup_steps=2", "the lr would never reach model.optim.lr"),
    "constant_steps_hold_min_lr": ("model.optim.sched.constant_steps=1000", "the lr would sit at min_lr"),
    # settings that used to be ignored silently
    "validation_shuffle": ("model.data.validation_ds.shuffle=true", "model.data.validation_ds.shuffle must be false"),
    "unknown_monitor": ("exp_manager.checkpoint_callback_params.monitor=train_loss", "monitor must be one of val_loss"),
    "eval_monitor_without_test_set": ("exp_manager.checkpoint_callback_params.monitor=eval_accuracy",
                                      "needs the held-out evaluation: set model.data.test_ds.file_path"),
    "monitor_mode_keeps_worst": ("exp_manager.checkpoint_callback_params.mode=max", "must be min for monitor=val_loss"),
    "max_time_twice": (["trainer.max_time=00:02:00:00", "exp_manager.max_time_per_run=00:01:00:00"],
                       "trainer.max_time (00:02:00:00) and exp_manager.max_time_per_run (00:01:00:00) disagree"),
    "fp16_with_fsdp": (["trainer.precision=16-mixed", "trainer.strategy=fsdp"], "16-mixed is not supported with"),
}


@pytest.mark.parametrize("override, message", list(CONFIGS.values()), ids=list(CONFIGS))
def test_bad_config_is_refused(paths, capsys, monkeypatch, override, message):
    overrides = override if isinstance(override, list) else [override]
    extra = ["model.spin.ref_policy_kl_penalty=[0.1,0.2]"] if "max_iterations" in overrides[0] else []
    if overrides[0].startswith("model.data.shuffle"):
        overrides = ["model.data.train_ds.shuffle=maybe"]
    keys = tuple(o.split("=")[0] + "=" for o in overrides)
    args = [a for a in base_args(paths) if not a.startswith(keys)]
    if overrides[0].startswith(("model.optim.lr=1e-3",)):
        args.append("model.optim.lr=2e-3")
    code, err = run_cli([*args, *extra, *overrides], capsys, monkeypatch)
    assert_refused(code, err, message, paths)


@pytest.mark.parametrize("key, package", [("create_wandb_logger", "wandb"), ("create_mlflow_logger", "mlflow")])
def test_tracker_without_its_package(paths, capsys, monkeypatch, key, package):
    from spinlm.utils import trackers

    real = trackers.find_spec
    monkeypatch.setattr(trackers, "find_spec", lambda name: None if name == package else real(name))
    code, err = run_cli([*base_args(paths), f"exp_manager.{key}=true"], capsys, monkeypatch)
    assert_refused(code, err, f"exp_manager.{key}=true needs the {package} package: pip install 'spinlm[loggers]'",
                   paths)


LORA_CONFIGS = {
    "unknown_peft_scheme": ("model.peft.peft_scheme=qlora",
                            "model.peft.peft_scheme must be one of ('none', 'lora'), got 'qlora'"),
    "rank_zero": ("model.peft.lora_tuning.adapter_dim=0",
                  "model.peft.lora_tuning.adapter_dim (the LoRA rank) must be >= 1, got 0"),
    "negative_rank": ("model.peft.lora_tuning.adapter_dim=-8",
                      "model.peft.lora_tuning.adapter_dim (the LoRA rank) must be >= 1"),
    "alpha_zero": ("model.peft.lora_tuning.alpha=0", "model.peft.lora_tuning.alpha must be > 0, got 0"),
    "dropout_one": ("model.peft.lora_tuning.adapter_dropout=1.0",
                    "model.peft.lora_tuning.adapter_dropout must be in [0, 1)"),
    "no_targets": ("model.peft.lora_tuning.target_modules=[]",
                   "model.peft.lora_tuning.target_modules must name at least"),
    "target_not_in_model": ("model.peft.lora_tuning.target_modules=[attention_qkv,c_fc]",
                            "model.peft.lora_tuning.target_modules: 'c_fc' matches no linear layer of LlamaForCausalLM"),
}


@pytest.mark.parametrize("override, message", list(LORA_CONFIGS.values()), ids=list(LORA_CONFIGS))
def test_bad_lora_config_is_refused(paths, capsys, monkeypatch, override, message):
    if "target_modules=[attention" in override:
        pytest.importorskip("peft")  # the model's layers are checked through peft's
    scheme = [] if "peft_scheme" in override else ["model.peft.peft_scheme=lora"]
    code, err = run_cli([*base_args(paths), *scheme, override], capsys, monkeypatch)
    assert_refused(code, err, message, paths)


def test_lora_without_peft(paths, capsys, monkeypatch):
    from spinlm.model import lora

    real = lora.find_spec
    monkeypatch.setattr(lora, "find_spec", lambda name: None if name == "peft" else real(name))
    code, err = run_cli([*base_args(paths), "model.peft.peft_scheme=lora"], capsys, monkeypatch)
    assert_refused(code, err, "model.peft.peft_scheme=lora needs the peft package: pip install 'spinlm[lora]'", paths)


def test_user_yaml_with_a_duplicate_key(paths, capsys, monkeypatch):
    conf = paths["tmp"] / "conf"
    conf.mkdir()
    (conf / "mine.yaml").write_text("model:\n  seed: 1\n  seed: 2\n", encoding="utf-8")
    code, err = run_cli(["--config-path", str(conf), "--config-name", "mine", *base_args(paths)], capsys, monkeypatch)
    assert_refused(code, err, "mine.yaml:3: found duplicate key", paths)


def test_no_resume_over_existing_checkpoints(paths, capsys, monkeypatch):
    (paths["run"] / "checkpoints" / "step_000002").mkdir(parents=True)
    code, err = run_cli([*base_args(paths), "exp_manager.resume_if_exists=false"], capsys, monkeypatch)
    assert code == 2 and "resume_if_exists=false but" in err and "step_000002" in err
    assert [p.name for p in (paths["run"] / "checkpoints").iterdir()] == ["step_000002"]


def test_debug_flag_shows_the_traceback(paths, monkeypatch):
    write_train(paths, GOOD + ["[1]"])
    from spinlm.errors import DataError

    with pytest.raises(DataError, match="train.jsonl:9"):
        cli.main(["train", "--debug", *base_args(paths)])
    monkeypatch.setenv("SPINLM_DEBUG", "1")
    with pytest.raises(DataError):
        cli.main(["train", *base_args(paths)])


def test_skip_bad_records_drops_and_counts(paths, capsys, monkeypatch, caplog):
    """The explicit opt-out: bad records are dropped with a count, the run goes on."""
    from spinlm.preflight import prepare
    from spinlm.config import load_config

    write_train(paths, GOOD + ["[1]", nemo([NEMO_TURNS[0]])])
    cfg = load_config([*base_args(paths), "model.data.skip_bad_records=true"])
    with caplog.at_level(logging.WARNING):
        prep = prepare(cfg)
    assert len(prep.train) == 8
    assert "skipped 2 bad record(s)" in caplog.text and "train.jsonl:9" in caplog.text
    assert not paths["run"].exists()  # the checks write nothing
