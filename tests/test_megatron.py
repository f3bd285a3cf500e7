"""NeMo's Megatron-only knobs: a value that changes nothing is one warning line, one that would change
results is a one-line config error, an unset knob says nothing."""

import copy
import logging

import pytest

from spinlm.config import load_config, validate
from spinlm.errors import ConfigError
from spinlm.megatron import KNOBS


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("cfg")
    (d / "t.jsonl").write_text("")
    (d / "m").mkdir()
    return [f"model.data.train_ds.file_path={d / 't.jsonl'}", f"model.data.validation_ds.file_path={d / 't.jsonl'}",
            f"pretrained_checkpoint.restore_from_path={d / 'm'}"]


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "spinlm.megatron"]


def test_unset_knobs_say_nothing(base, caplog):
    with caplog.at_level(logging.WARNING):
        validate(load_config(base))
    assert _warnings(caplog) == []


NO_OP = {
    "++model.tensor_model_parallel_size=1": "model.tensor_model_parallel_size=1",
    "++model.pipeline_model_parallel_size=1": "model.pipeline_model_parallel_size=1",
    "model.megatron_amp_O2=True": "model.megatron_amp_O2=True",
    "model.mcore_gpt=True": "model.mcore_gpt=True",
    "++model.sequence_parallel=True": "model.sequence_parallel=True",
    "model.optim.name=distributed_fused_adam": "model.optim.name=distributed_fused_adam runs as torch AdamW",
    "model.optim.bucket_cap_mb=200": "model.optim.bucket_cap_mb=200",
    "model.optim.overlap_grad_sync=False": "model.optim.overlap_grad_sync=False",
    "model.optim.contiguous_grad_buffer=True": "model.optim.contiguous_grad_buffer=True",
    "model.spin.offload_adam_states=True": "model.spin.offload_adam_states=True",
    "model.data.num_workers=0": "model.data.num_workers=0",
}


def test_each_no_op_knob_is_one_warning_line(base, caplog):
    with caplog.at_level(logging.WARNING):
        validate(load_config([*base, *NO_OP]))
    lines = _warnings(caplog)
    assert len(lines) == len(NO_OP), lines
    for expected in NO_OP.values():
        assert sum(line.startswith(expected) for line in lines) == 1, (expected, lines)
    assert all("\n" not in line for line in lines)


@pytest.mark.parametrize("override, message", [
    ("++model.tensor_model_parallel_size=2", "model.tensor_model_parallel_size=2 is not supported: tensor parallelism"),
    ("model.pipeline_model_parallel_size=4", "model.pipeline_model_parallel_size=4 is not supported: pipeline"),
    ("model.virtual_pipeline_model_parallel_size=2", "virtual_pipeline_model_parallel_size=2 is not supported"),
    ("model.context_parallel_size=2", "model.context_parallel_size=2 is not supported"),
    ("model.expert_model_parallel_size=8", "model.expert_model_parallel_size=8 is not supported"),
    ("model.optim.name=sgd", "model.optim.name must be adamw"),
    ("model.optim.name=adam", "model.optim.name must be adamw"),  # NeMo's adam: L2 decay, another update
])
def test_knobs_that_would_change_results_are_refused(base, override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")) as e:
        validate(load_config([*base, override]))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override, message", [
    ("model.megatron_amp_O2=1", "'model.megatron_amp_O2' must be true or false"),
    ("++model.tensor_model_parallel_size=one", "'model.tensor_model_parallel_size' must be an integer"),
    ("model.data.num_workers=true", "'model.data.num_workers' must be an integer"),
])
def test_knob_types_are_checked(base, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([*base, override])


def test_every_knob_is_in_the_yaml_and_the_readme():
    from pathlib import Path

    from omegaconf import OmegaConf

    defaults = load_config()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for key in KNOBS:
        assert OmegaConf.select(defaults, key, default="missing") is None, key  # null = not set
        assert f"`{key.removeprefix('model.')}`" in readme, key  # the README's table names them under model.


def test_warnings_only_on_rank_zero(base, caplog, monkeypatch):
    cfg = load_config([*base, "model.mcore_gpt=True"])
    monkeypatch.setenv("RANK", "1")
    with caplog.at_level(logging.WARNING):
        validate(copy.deepcopy(cfg))
    assert _warnings(caplog) == []
