"""The memory estimate (model/memory.py): its accounting against real tensors, its activation coefficients
against what autograd keeps, the start line and the CUDA refusal."""

import logging
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from spinlm.algorithms.scoring import pair_logprobs
from spinlm.config import load_config
from spinlm.errors import ConfigError
from spinlm.model import memory
from spinlm.model.precision import precision_of
from spinlm.model.reference import FrozenReference, PolicyAsReference
from spinlm.train import adamw

WORK = memory.Workload(micro_batch_size=2, row_tokens=40, answer_tokens=10, mean_answer_tokens=8, rollout_batch=4,
                       prompt_tokens=20, new_tokens=10)


def _config(hidden=64, intermediate=176, heads=4, kv_heads=2, tie=False):
    return LlamaConfig(vocab_size=300, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tie)


def _bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("precision", ["32", "bf16-mixed", "bf16"])
@pytest.mark.parametrize("tie", [False, True])
def test_static_bytes_are_what_the_run_allocates(precision, tie):
    """Weights, gradients, optimizer state and reference after one step equal the estimate's bytes per parameter:
    a frozen copy where the run keeps one (regenerating each epoch), else none, plus under mixed precision the
    compute-dtype copy the policy-as-reference makes for generation."""
    config, p = _config(tie=tie), precision_of(precision)
    est = memory.estimate(config, p, "single", 1, WORK, regenerate_each_epoch=True)
    shared = memory.estimate(config, p, "single", 1, WORK)
    torch.manual_seed(0)
    policy = LlamaForCausalLM(config).to(p.param_dtype)
    reference = FrozenReference.copy_of(policy, p)
    optimizer = adamw(list(policy.parameters()), lr=1e-3)
    with p.autocast("cpu"):
        policy(input_ids=torch.tensor([[1, 2, 3]])).logits.float().sum().backward()
    optimizer.step()
    params = list(policy.parameters())
    assert est.parameters == sum(t.numel() for t in params)
    state = [t for s in optimizer.state.values() for k, t in s.items() if k != "step"]
    measured = {"weights": _bytes(params), "gradients": _bytes(t.grad for t in params),
                "optimizer": _bytes(state), "reference": _bytes(reference.module.parameters())}
    for holder, value in measured.items():
        assert est.per_param[holder] * est.parameters == pytest.approx(value), holder
    assert shared.per_param == {**est.per_param, "reference": 0.0}
    with PolicyAsReference(policy, p).active() as module:
        generation_copy = 0 if module is policy else _bytes(module.parameters())
    assert generation_copy == (measured["reference"] if p.autocast_dtype is not None else 0)
    assert shared.generation_extra.get("reference copy", 0) == pytest.approx(generation_copy)


def _saved_bytes(model, pairs, autocast):
    sizes = {}

    def keep(t):
        sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), autocast:
        pair_logprobs(model, *pairs, pad_id=0)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(v for k, v in sizes.items() if k not in weights)


@pytest.mark.parametrize("precision", ["32", "bf16-mixed", "bf16"])
def test_activation_coefficients_match_what_autograd_keeps(precision):
    """Per token and layer, a * hidden + b * intermediate bytes (+ autocast's weight copies), on a shape the
    coefficients were not fitted on; the layer's share is the difference between 4 and 2 layers."""
    p = precision_of(precision)
    hidden, intermediate, tokens = 192, 544, 3 * 60
    pairs = ([[5] * 30] * 3, [[6] * 12] * 3, [[7] * 18] * 3)
    saved = {}
    for layers in (2, 4):
        config = _config(hidden, intermediate, heads=6, kv_heads=3)
        config.num_hidden_layers = layers
        torch.manual_seed(0)
        saved[layers] = _saved_bytes(LlamaForCausalLM(config).to(p.param_dtype).train(), pairs, p.autocast("cpu"))
    per_layer = (saved[4] - saved[2]) / 2
    a, b = memory.ACTIVATION_BYTES[memory._mode(p)]
    expected = (a * hidden + b * intermediate) * tokens
    if p.autocast_dtype is not None:  # the bf16 copies of a layer's linear weights
        expected += 2 * (hidden * hidden * 2 + hidden * hidden + 3 * hidden * intermediate)
    assert per_layer == pytest.approx(expected, rel=0.05)


def test_sharding_and_recomputation_lower_the_estimate():
    config, p = _config(), precision_of("bf16")
    config.num_hidden_layers = 4
    single = memory.estimate(config, p, "single", 1, WORK)
    fsdp = memory.estimate(config, p, "fsdp", 4, WORK)
    assert fsdp.bytes_per_param == pytest.approx(single.bytes_per_param / 4)
    assert fsdp.generation_extra["gathered reference"] > 0
    ddp = memory.estimate(config, p, "ddp", 4, WORK)
    assert ddp.bytes_per_param == single.bytes_per_param and not ddp.gradients_freed
    full = memory.estimate(config, p, "single", 1, WORK, ("full", None, None))
    block = memory.estimate(config, p, "single", 1, WORK, ("full", "block", 1))
    acts = [e.train_extra["activations"] for e in (single, block, full)]
    assert acts[0] > acts[1] > acts[2]
    assert single.bytes_per_param == 14  # 2 + 2 + 10: the policy is the reference
    assert memory.estimate(config, p, "single", 1, WORK, regenerate_each_epoch=True).bytes_per_param == 16  # + 2
    assert memory.estimate(config, precision_of("32"), "single", 1, WORK).bytes_per_param == 16


def test_one_line_at_start_and_a_clear_error_when_cuda_memory_is_short(tiny_model_dir, monkeypatch, caplog):
    cfg = load_config([f"pretrained_checkpoint.restore_from_path={tiny_model_dir}", "model.encoder_seq_length=128",
                       "model.spin.length_params.max_length=24"])
    samples = [{"prompt_ids": [1] * 30, "answer_ids": [2] * 10}]
    with caplog.at_level(logging.INFO, logger="spinlm.model.memory"):
        est = memory.report(cfg, samples, "single", 1, torch.device("cpu"))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert f"{est.parameters / 1e6:.1f}M parameters" in lines[0] and "B/param" in lines[0]
    assert "expected peak" in lines[0]

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=est.peak_bytes / 2))
    with pytest.raises(ConfigError) as e:
        memory.report(cfg, samples, "single", 1, torch.device("cuda", 0))
    message = str(e.value)
    assert "\n" not in message and "exceeds" in message
    for key in ("trainer.precision=bf16", "model.activations_checkpoint_granularity=full", "model.micro_batch_size"):
        assert key in message
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=est.peak_bytes * 2))
    memory.report(cfg, samples, "single", 1, torch.device("cuda", 0))  # fits: no error
