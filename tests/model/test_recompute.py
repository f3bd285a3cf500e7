"""Activation checkpointing (model/recompute.py): NeMo's keys, exact losses and gradients, packed pairs, FSDP2."""

import copy

import pytest
import torch
from spawn import run_ranks

from spinlm.algorithms.scoring import pair_logprobs
from spinlm.config import load_config, validate_memory_keys
from spinlm.errors import ConfigError
from spinlm.model import parallel
from spinlm.model.kernels import use_onednn_linears
from spinlm.model.recompute import apply_activation_checkpointing
from spinlm.model.tiny import build_tiny_model, build_tiny_tokenizer

MODES = [("full", None, None), ("full", "uniform", 1), ("full", "block", 1), ("selective", None, None)]


def _model(dropout: float = 0.0):
    model = build_tiny_model(build_tiny_tokenizer(), num_layers=3, seed=5)
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = dropout
    use_onednn_linears(model, "auto")
    return model.train()


def _pairs(seed: int, n: int = 3):
    g = torch.Generator().manual_seed(seed)

    def ids(k):
        return torch.randint(3, 300, (k,), generator=g).tolist()
    return [ids(9 + i) for i in range(n)], [ids(4 + i) for i in range(n)], [ids(6 - i) for i in range(n)]


def _loss_and_grads(model, pairs, packed=True, seed=0):
    torch.manual_seed(seed)  # the dropout stream
    act, gen = pair_logprobs(model, *pairs, pad_id=0, packed=packed)
    loss = -torch.nn.functional.logsigmoid(0.1 * (act - gen)).mean()
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("packed", [True, False])
def test_loss_and_gradients_equal_no_checkpointing(mode, packed):
    plain = _model(dropout=0.2)  # dropout: the recomputed forward must replay the same masks
    ckpt = copy.deepcopy(plain)
    assert apply_activation_checkpointing(ckpt, *mode) == (1 if mode[1] == "block" else 3)
    pairs = _pairs(0)
    loss, grads = _loss_and_grads(plain, pairs, packed)
    loss_c, grads_c = _loss_and_grads(ckpt, pairs, packed)
    torch.testing.assert_close(loss_c, loss, rtol=0, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(grads_c[name], g, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode,recomputed", [(MODES[0], [2, 2, 2]), (MODES[2], [2, 1, 1]), (MODES[3], [2, 2, 2])])
def test_layers_run_again_in_backward_and_nowhere_else(mode, recomputed):
    model = _model()
    apply_activation_checkpointing(model, *mode)
    calls = [0] * 3
    for k, layer in enumerate(model.model.layers):
        # a pre-hook: the recomputation stops as soon as the last saved tensor is back, inside the MLP
        layer.mlp.register_forward_pre_hook(lambda *a, k=k: calls.__setitem__(k, calls[k] + 1))
    _loss_and_grads(model, _pairs(1))
    assert calls == recomputed
    calls[:] = [0] * 3
    with torch.no_grad():  # reference log-probs, generation: nothing to recompute
        pair_logprobs(model, *_pairs(1), pad_id=0)
    model.eval()
    pair_logprobs(model, *_pairs(1), pad_id=0)[0].sum().backward()  # eval mode (validation): off
    assert calls == [2, 2, 2]


def test_full_checkpointing_keeps_only_layer_inputs():
    def saved_bytes(model):
        sizes = {}

        def keep(t):
            sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            pair_logprobs(model, *_pairs(2), pad_id=0)
        return sum(sizes.values())

    plain = _model()
    ckpt = copy.deepcopy(plain)
    apply_activation_checkpointing(ckpt, "full")
    assert saved_bytes(ckpt) < 0.5 * saved_bytes(plain)


def _fsdp_rank(rank, modes):
    """Each rank: its half of the pairs through a 2-rank FSDP2 model, with and without recomputation."""
    out = {}
    pairs = _pairs(3, n=4)
    mine = [rows[rank * 2:(rank + 1) * 2] for rows in pairs]
    for mode in modes:
        model = _model()
        apply_activation_checkpointing(model, *mode)
        model = parallel.wrap_policy(model, "fsdp", torch.device("cpu"))
        loss, _ = _loss_and_grads(model, mine)
        out[mode] = (loss, {n: p.grad.full_tensor() for n, p in model.named_parameters()})
    return out


def test_fsdp2_with_checkpointing_matches_without(tmp_path):
    modes = [(None, None, None), MODES[0], MODES[3]]
    results = run_ranks(_fsdp_rank, 2, tmp_path, modes)
    for rank in results:
        loss, grads = rank[modes[0]]
        for mode in modes[1:]:
            loss_c, grads_c = rank[mode]
            torch.testing.assert_close(loss_c, loss, rtol=0, atol=1e-6)
            for name, g in grads.items():
                torch.testing.assert_close(grads_c[name], g, rtol=0, atol=1e-6, msg=f"{mode} {name}")


@pytest.mark.parametrize("overrides,key", [
    (["model.activations_checkpoint_granularity=partial"], "model.activations_checkpoint_granularity"),
    (["model.activations_checkpoint_method=chunks"], "model.activations_checkpoint_method"),
    (["model.activations_checkpoint_num_layers=0"], "model.activations_checkpoint_num_layers"),
    (["model.activations_checkpoint_granularity=full", "model.activations_checkpoint_method=block"],
     "model.activations_checkpoint_num_layers"),
    (["model.activations_checkpoint_granularity=full", "model.activations_checkpoint_num_layers=2"],
     "model.activations_checkpoint_num_layers"),
    (["trainer.precision=bf16-true"], "trainer.precision"),
])
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        validate_memory_keys(load_config(overrides))
    assert key in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("overrides,key", [
    (["model.activations_checkpoint_method=block"], "model.activations_checkpoint_method"),
    (["model.activations_checkpoint_granularity=selective", "model.activations_checkpoint_num_layers=4"],
     "model.activations_checkpoint_num_layers"),
])
def test_keys_that_only_full_granularity_reads_are_errors_otherwise(overrides, key):
    """Megatron refuses a layer count with selective recomputation; a method without granularity would do nothing."""
    with pytest.raises(ConfigError, match=key) as e:
        validate_memory_keys(load_config(overrides))
    assert "granularity=full" in str(e.value)
    validate_memory_keys(load_config(["model.activations_checkpoint_granularity=full",
                                      "model.activations_checkpoint_method=block",
                                      "model.activations_checkpoint_num_layers=2"]))
