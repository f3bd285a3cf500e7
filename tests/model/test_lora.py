"""LoRA on a tiny Llama: NeMo's target names, seeded fresh adapters, the reference with adapters off,
and merges at an iteration end (the policy's outputs stay; the reference becomes the policy)."""

import copy

import pytest
import torch

pytest.importorskip("peft")

from spinlm.errors import ConfigError  # noqa: E402
from spinlm.model import lora  # noqa: E402
from spinlm.model.logprobs import masked_sum_logprobs  # noqa: E402
from spinlm.model.reference import LoraReference  # noqa: E402
from spinlm.model.tiny import build_tiny_model  # noqa: E402

SETTINGS = lora.LoraSettings(rank=4, alpha=8.0, dropout=0.0, targets=("all",), seed=7)


@pytest.fixture(scope="module")
def base(tokenizer):
    return build_tiny_model(tokenizer, seed=1)


@pytest.fixture
def policy(base):
    return lora.add_adapters(copy.deepcopy(base), SETTINGS)


@pytest.fixture(scope="module")
def batch(tokenizer):
    texts = ["What is 12 + 7? The answer is 19.", "Hello! How can I help you today? Hello!"]
    ids = torch.tensor([tokenizer.encode(t)[:14] for t in texts])
    masks = torch.zeros_like(ids, dtype=torch.bool)
    masks[:, 5:] = True
    return ids, masks


def _train_adapters(model, seed=0):
    """Stand-in for training: every adapter weight moved (B away from zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _logprobs(model, batch):
    with torch.no_grad():
        return masked_sum_logprobs(model, *batch)


# ----- target names --------------------------------------------------------------------------
@pytest.mark.parametrize("targets, expected", [
    (("attention_qkv",), ["q_proj", "k_proj", "v_proj"]),
    (("attention_dense", "mlp_fc2"), ["o_proj", "down_proj"]),
    (("mlp",), ["gate_proj", "up_proj", "down_proj"]),
    (("all",), ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    (("q_proj", "attention_qkv", "lm_head"), ["q_proj", "k_proj", "v_proj", "lm_head"]),  # HF names, deduplicated
])
def test_nemo_names_map_onto_llama_layers(base, targets, expected):
    assert lora.resolve_targets(base, targets) == expected


@pytest.mark.parametrize("target, message", [
    ("c_attn", "'c_attn' matches no linear layer of LlamaForCausalLM; its linear layers: down_proj, gate_proj"),
    ("attention_qkvv", "'attention_qkvv' matches no linear layer"),
    ("embed_tokens", "'embed_tokens' matches no linear layer"),  # an embedding, not a linear layer
])
def test_a_target_the_model_lacks_is_a_config_error_naming_the_key(base, target, message):
    with pytest.raises(ConfigError, match="model.peft.lora_tuning.target_modules: " + message):
        lora.resolve_targets(base, (target,))


def test_a_tied_lm_head_cannot_be_adapted(tokenizer):
    model = build_tiny_model(tokenizer)
    model.lm_head.weight = model.model.embed_tokens.weight
    with pytest.raises(ConfigError, match="lm_head shares its weight"):
        lora.resolve_targets(model, ("lm_head",))


def test_check_targets_needs_no_weights(base):
    assert lora.check_targets(base.config, SETTINGS)[:2] == ["q_proj", "k_proj"]


# ----- adapters ------------------------------------------------------------------------------
def test_fresh_adapters_are_seeded_change_nothing_and_leave_the_global_rng(base, batch):
    rng = torch.get_rng_state()
    a, b = (lora.add_adapters(copy.deepcopy(base), SETTINGS) for _ in range(2))
    assert torch.equal(torch.get_rng_state(), rng)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    layer = a.model.layers[0].self_attn.q_proj
    assert layer.lora_A[lora.ADAPTER].weight.abs().sum() > 0 and not layer.lora_B[lora.ADAPTER].weight.any()
    trainable = {n for n, p in a.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    torch.testing.assert_close(_logprobs(a, batch), _logprobs(base, batch), rtol=0, atol=0)  # B = 0


def test_reference_is_the_base_model_with_adapters_off(policy, base, batch):
    _train_adapters(policy)
    reference = LoraReference(policy, SETTINGS)
    policy.train()
    with reference.active() as module:
        assert module is policy and not module.training and not torch.is_grad_enabled()
        torch.testing.assert_close(masked_sum_logprobs(module, *batch), _logprobs(base, batch), rtol=0, atol=0)
    assert policy.training  # back as it was, adapters on, trainable
    assert not torch.allclose(_logprobs(policy, batch), _logprobs(base, batch))
    assert all(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n)
    assert reference.state_dict().keys() == base.state_dict().keys()  # plain Hugging Face names
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in reference.full_state_dict().items())


def test_after_a_merge_the_reference_equals_a_model_with_the_merged_weights(policy, tokenizer, batch):
    _train_adapters(policy)
    merged = lora.merged_state_dict(policy.state_dict(), SETTINGS.scaling)
    plain = build_tiny_model(tokenizer)
    plain.load_state_dict(merged)
    assert not torch.allclose(_logprobs(plain, batch), _logprobs(build_tiny_model(tokenizer, seed=1), batch))

    reference = LoraReference(policy, SETTINGS)
    reference.refresh_from(policy)
    torch.testing.assert_close(reference.logprobs(*batch), _logprobs(plain, batch), rtol=0, atol=0)
    state = reference.state_dict()
    assert all(torch.equal(state[k], merged[k]) for k in merged) and state.keys() == merged.keys()


def test_a_merge_leaves_the_policy_outputs_and_starts_fresh_adapters(policy, batch):
    _train_adapters(policy)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    _logprobs(policy, batch)
    policy(input_ids=batch[0]).logits.sum().backward()
    optimizer.step()
    before = _logprobs(policy, batch)
    a_before = policy.model.layers[0].mlp.down_proj.lora_A[lora.ADAPTER].weight.clone()

    reference = LoraReference(policy, SETTINGS)
    reference.refresh_from(policy, optimizer)
    torch.testing.assert_close(_logprobs(policy, batch), before, rtol=1e-5, atol=1e-5)  # the merge's rounding only
    torch.testing.assert_close(reference.logprobs(*batch), before, rtol=1e-5, atol=1e-5)
    layer = policy.model.layers[0].mlp.down_proj
    assert not layer.lora_B[lora.ADAPTER].weight.any()
    assert not torch.equal(layer.lora_A[lora.ADAPTER].weight, a_before)
    assert reference.checkpoint_state() == {"merges": 1}
    for state in optimizer.state.values():  # as fresh: step 0, zero moments
        assert all(not v.any() for v in state.values())

    twin = copy.deepcopy(policy)  # any run draws the same adapters after merge 1
    _train_adapters(twin, seed=1)
    lora.fresh_adapters(twin, SETTINGS, merges=1)
    assert torch.equal(twin.model.layers[0].mlp.down_proj.lora_A[lora.ADAPTER].weight,
                       layer.lora_A[lora.ADAPTER].weight)


def test_hf_state_dict_is_the_merged_plain_model(policy, base):
    _train_adapters(policy)
    state = lora.hf_state_dict(policy)
    assert state.keys() == base.state_dict().keys()
    expected = lora.merged_state_dict(policy.state_dict(), SETTINGS.scaling)
    assert all(torch.equal(state[k], expected[k]) for k in state)
    w = policy.model.layers[1].self_attn.v_proj
    a, b = w.lora_A[lora.ADAPTER].weight, w.lora_B[lora.ADAPTER].weight
    torch.testing.assert_close(state["model.layers.1.self_attn.v_proj.weight"],
                               w.base_layer.weight + SETTINGS.scaling * b @ a)


def test_optimizer_reset_refuses_a_state_adam_does_not_have():
    p = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(2)
    optimizer.step()  # SGD keeps a momentum buffer
    with pytest.raises(TypeError, match="'momentum_buffer'"):
        lora.reset_optimizer_state(optimizer)
