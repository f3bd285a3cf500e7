"""The command line end to end: `python -m spinlm train` on the long multi-turn NeMo sample chats."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NEMO_SAMPLE = ROOT / "examples" / "data" / "nemo_dummy_sft.jsonl"


def spinlm(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("SPINLM_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "spinlm", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_train_end_to_end_two_iterations_two_epochs(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "exp1"
    result = spinlm(
        "train",
        f"pretrained_checkpoint.restore_from_path={tiny_model_dir}",
        f"model.data.train_ds.file_path={NEMO_SAMPLE}",
        f"model.data.validation_ds.file_path={NEMO_SAMPLE}",
        "trainer.spin.max_iterations=2", "trainer.spin.max_epochs=2",
        "model.spin.ref_policy_kl_penalty=0.1", "model.data.chat=True",
        "model.global_batch_size=8", "model.micro_batch_size=4",
        "model.spin.length_params.max_length=32",
        f"exp_manager.explicit_log_dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    # 30 conversations // 8 = 3 steps an epoch, x 2 epochs x 2 iterations
    assert [r["step"] for r in train_rows] == list(range(1, 13))
    assert {r["train/iteration"] for r in train_rows} == {0, 1}
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "final" / "model.safetensors").is_file()
    assert any((run_dir / "tensorboard").iterdir())
    assert "prompts cut" in result.stderr  # the length policy reports what it did to the long chats


@pytest.mark.parametrize("override, message", [
    ("trainer.spin.max_iteratons=2", "unknown key 'trainer.spin.max_iteratons'"),
    ("model.optim.lr=fast", "'model.optim.lr' must be a number"),
    ("trainer.max_time=1h", "trainer.max_time must be 'DD:HH:MM:SS'"),
])
def test_bad_config_is_one_clear_line(tmp_path, tiny_model_dir, override, message):
    result = spinlm(
        "train", f"pretrained_checkpoint.restore_from_path={tiny_model_dir}",
        f"model.data.train_ds.file_path={NEMO_SAMPLE}", f"model.data.validation_ds.file_path={NEMO_SAMPLE}",
        f"exp_manager.explicit_log_dir={tmp_path / 'run'}", override, cwd=tmp_path,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_missing_data_file_names_the_file(tmp_path, tiny_model_dir):
    result = spinlm(
        "train", f"pretrained_checkpoint.restore_from_path={tiny_model_dir}",
        f"model.data.train_ds.file_path={tmp_path / 'nope.jsonl'}",
        f"model.data.validation_ds.file_path={NEMO_SAMPLE}",
        f"exp_manager.explicit_log_dir={tmp_path / 'run'}", cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "nope.jsonl" in result.stderr and "Traceback" not in result.stderr


def test_make_task_then_evaluate(tmp_path, tiny_model_dir):
    made = spinlm("make-task", str(tmp_path / "task"), "--train", "10", "--validation", "3", "--test", "5",
                  cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-2000:]
    assert len((tmp_path / "task" / "test.jsonl").read_text().splitlines()) == 5
    result = spinlm("evaluate", str(tiny_model_dir), str(tmp_path / "task" / "test.jsonl"), "--limit", "4",
                    "--max-new-tokens", "6", "--out", str(tmp_path / "answers.jsonl"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "held-out accuracy" in result.stdout and "SFT loss" in result.stdout
    assert len((tmp_path / "answers.jsonl").read_text().splitlines()) == 4


def test_prepare_model_names_a_missing_gguf(tmp_path, tiny_model_dir):
    result = spinlm("prepare-model", "--gguf", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "m"),
                    cwd=tmp_path)
    assert result.returncode == 2 and "missing.gguf" in result.stderr


def test_devices_from_one_process_starts_them(tmp_path, tiny_model_dir, chat_files):
    """`trainer.devices=2` without torchrun: spinlm starts the 2 processes itself (NeMo's commands
    ask for devices this way; Lightning starts them for NeMo)."""
    run_dir = tmp_path / "run"
    result = spinlm(
        "train", f"pretrained_checkpoint.restore_from_path={tiny_model_dir}",
        f"model.data.train_ds.file_path={chat_files[0]}", f"model.data.validation_ds.file_path={chat_files[1]}",
        f"exp_manager.explicit_log_dir={run_dir}", "trainer.devices=2", "trainer.accelerator=cpu",
        "trainer.precision=32", "trainer.spin.max_iterations=1", "trainer.spin.limit_train_batches=1",
        "model.global_batch_size=4", "model.micro_batch_size=2", "model.encoder_seq_length=128",
        "model.spin.length_params.max_length=16", "model.optim.sched.name=Constant",
        "model.optim.sched.warmup_steps=0", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trainer.devices=2: starting 2 processes" in result.stderr
    assert "2 processes on 1 node(s), strategy ddp" in result.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1]


def test_sft_command_trains_and_refuses_bad_sft_keys(tmp_path, tiny_model_dir):
    common = [f"pretrained_checkpoint.restore_from_path={tiny_model_dir}", f"model.data.train_ds.file_path={NEMO_SAMPLE}",
              f"model.data.validation_ds.file_path={NEMO_SAMPLE}", "trainer.spin.max_iterations=1",
              "model.global_batch_size=8", "model.micro_batch_size=4", "model.spin.length_params.max_length=32"]
    bad = spinlm("sft", *common, "model.sft.loss_turns=some", f"exp_manager.explicit_log_dir={tmp_path / 'bad'}",
                 cwd=tmp_path)
    assert bad.returncode == 2 and "model.sft.loss_turns must be one of" in bad.stderr
    assert not (tmp_path / "bad").exists()
    run_dir = tmp_path / "sft"
    result = spinlm("sft", *common, "model.sft.loss_turns=all", f"exp_manager.explicit_log_dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]  # 30 conversations // 8
    assert (run_dir / "final" / "model.safetensors").is_file()
