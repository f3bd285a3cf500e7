"""NeMo-Aligner's documented SPIN command (docs/user-guide/spin.rst, "SPIN Model Training") runs with only
the model path pointing at a Hugging Face model: every key it sets is honoured.

The commands below are the documentation's, key for key and in its order; `${...}` are its shell
variables. The runs scale them down (1 device, the tiny model, short lengths) by changing values only,
plus a learning-rate schedule that fits a 2-step run (NeMo's default warms up for 10 steps)."""

import json
import logging

import pytest
from conftest import write_chat_jsonl
from omegaconf import OmegaConf

from spinlm.config import load_config, validate
from spinlm.train import run


@pytest.fixture
def chat_files(tmp_path):
    """8 training and 4 validation conversations: two steps of 4."""
    return write_chat_jsonl(tmp_path / "train.jsonl", 16, seed=0), write_chat_jsonl(tmp_path / "val.jsonl", 8, seed=1)

TERMINAL = [
    "trainer.num_nodes=1",
    "trainer.devices=8",
    "model.micro_batch_size=1",
    "model.global_batch_size=64",
    "pretrained_checkpoint.restore_from_path=/path/to/megatron_gpt_sft.nemo",
    "model.data.train_ds.file_path=${TRAIN_DATA_PATH}",
    "model.data.validation_ds.file_path=${VALID_DATA_PATH}",
    "exp_manager.create_wandb_logger=false",
    "exp_manager.wandb_logger_kwargs.project=spin_training",
    "exp_manager.wandb_logger_kwargs.name=spin_training",
    "exp_manager.explicit_log_dir=/results",
    "trainer.spin.max_iterations=1",
    "trainer.spin.max_epochs=1",
    "model.spin.ref_policy_kl_penalty=0.1",
    "model.spin.length_params.max_length=2048",
    "model.data.train_ds.max_seq_length=4096",
]

SLURM = [
    "trainer.num_nodes=${SLURM_JOB_NUM_NODES}",
    "trainer.devices=8",
    "pretrained_checkpoint.restore_from_path='${PRETRAINED_CHECKPOINT_NEMO_FILE}'",
    "model.data.train_ds.file_path=${TRAIN_DATA_PATH}",
    "model.data.validation_ds.file_path=${VALID_DATA_PATH}",
    "model.micro_batch_size=1",
    "model.global_batch_size=64",
    "exp_manager.explicit_log_dir=${RESULTS_DIR}",
    "exp_manager.create_wandb_logger=True",
    "exp_manager.wandb_logger_kwargs.name=${NAME}",
    "exp_manager.wandb_logger_kwargs.project=${PROJECT}",
    "trainer.spin.max_iterations=1",
    "trainer.spin.max_epochs=1",
    "model.spin.ref_policy_kl_penalty=0.1",
    "model.spin.length_params.max_length=2048",
    "model.data.train_ds.max_seq_length=4096",
]

# the one change the task allows: the model path (a .nemo file) points at a Hugging Face model
MODEL_KEY = "pretrained_checkpoint.restore_from_path"
# scaled down: values of the command's own keys (1 device, the tiny model's context) ...
SCALED = {"trainer.devices": "1", "model.global_batch_size": "4", "model.spin.length_params.max_length": "16",
          "model.data.train_ds.max_seq_length": "96", "trainer.num_nodes": "1"}
# ... and a schedule for a 2-step run
SHORT_RUN = ["model.optim.sched.warmup_steps=1", "model.optim.sched.constant_steps=0"]


def substitute(command, variables, scaled=None):
    out = []
    for override in command:
        key, value = override.split("=", 1)
        for name, sub in variables.items():
            value = value.replace("${" + name + "}", str(sub))
        out.append(f"{key}={(scaled or {}).get(key, value)}")
    return out


def variables(tmp_path, tiny_model_dir, chat_files):
    return {"TRAIN_DATA_PATH": chat_files[0], "VALID_DATA_PATH": chat_files[1], "RESULTS_DIR": tmp_path / "results",
            "SLURM_JOB_NUM_NODES": 1, "NAME": "spin_run", "PROJECT": "spin_project",
            "PRETRAINED_CHECKPOINT_NEMO_FILE": tiny_model_dir}


def with_model(command, model_dir, results):
    return [f"{MODEL_KEY}={model_dir}" if o.startswith(MODEL_KEY) else
            f"exp_manager.explicit_log_dir={results}" if o == "exp_manager.explicit_log_dir=/results" else o
            for o in command]


def test_the_documented_command_sets_only_keys_spinlm_honours(tmp_path, tiny_model_dir, chat_files):
    """Unscaled: composes, every value lands where the command put it, and it validates for the 8
    processes it asks for."""
    command = with_model(substitute(TERMINAL, variables(tmp_path, tiny_model_dir, chat_files)), tiny_model_dir,
                         tmp_path / "results")
    cfg = load_config(command)
    validate(cfg, world_size=8)
    for override in command:
        key, value = override.split("=", 1)
        assert str(OmegaConf.select(cfg, key)).lower() == value.strip("'").lower(), key
    assert cfg.model.data.validation_ds.max_seq_length == 4096  # as NeMo: follows train_ds


@pytest.mark.parametrize("tab", ["terminal", "slurm"])
def test_the_documented_command_scaled_down_trains(tab, tmp_path, tiny_model_dir, chat_files, monkeypatch, caplog):
    if tab == "slurm":  # this tab logs to W&B: offline here
        pytest.importorskip("wandb")
        monkeypatch.setenv("WANDB_MODE", "offline")
        monkeypatch.setenv("WANDB_SILENT", "true")
    results = tmp_path / "results"
    command = substitute(TERMINAL if tab == "terminal" else SLURM, variables(tmp_path, tiny_model_dir, chat_files),
                         SCALED)
    command = with_model(command, tiny_model_dir, results)
    with caplog.at_level(logging.WARNING):
        trainer = run(load_config([*command, *SHORT_RUN]))
    rows = [json.loads(line) for line in (results / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]  # 8 samples / 4, 1 iteration, 1 epoch
    assert {r["train/beta"] for r in rows if "train/loss" in r} == {0.1}
    data = trainer.model_cfg.data
    assert trainer.sampling.max_length == 16 and data.train_ds.max_seq_length == data.validation_ds.max_seq_length == 96
    assert (results / "final" / "model.safetensors").is_file()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "spinlm.megatron"]
    if tab == "slurm":
        from spinlm.utils.trackers import _records, offline_history

        run_id = json.loads((results / "trackers.json").read_text())["wandb"]["id"]
        (path,) = (results / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
        (record,) = [r.run for r in _records(path) if r.HasField("run")]
        assert (record.project, record.display_name) == ("spin_project", "spin_run")
        assert [r["_step"] for r in offline_history(results, run_id) if "train/loss" in r] == [1, 2]
    else:
        assert not (results / "wandb").exists()


def test_megatron_knobs_of_nemo_commands_run_with_one_warning_each(tmp_path, tiny_model_dir, chat_files, caplog):
    """The `++model.*` knobs NeMo-Aligner's other commands add (Hydra's force-add syntax)."""
    command = with_model(substitute(TERMINAL, variables(tmp_path, tiny_model_dir, chat_files), SCALED),
                         tiny_model_dir, tmp_path / "results")
    knobs = ["++model.tensor_model_parallel_size=1", "++model.pipeline_model_parallel_size=1",
             "model.megatron_amp_O2=True", "model.mcore_gpt=True"]
    cfg = load_config([*command, *SHORT_RUN, *knobs])
    with caplog.at_level(logging.WARNING):
        validate(cfg)
    lines = [r.getMessage() for r in caplog.records if r.name == "spinlm.megatron"]
    assert len(lines) == 4 and all(line.split(" ")[0] in {k.lstrip("+") for k in knobs} for line in lines)
