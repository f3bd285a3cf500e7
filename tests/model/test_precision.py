"""trainer.precision: the reference in the compute dtype, exact under autocast; bf16 training end to end."""

import pytest
import torch
from torch.profiler import profile

from spinlm.algorithms.scoring import pair_logprobs
from spinlm.model.decoding import decode_batch
from spinlm.model.precision import frozen_copy, precision_of
from spinlm.model.reference import FrozenReference
from spinlm.model.tiny import build_tiny_model


def _tied(tokenizer):
    model = build_tiny_model(tokenizer, seed=2)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


def test_mixed_reference_keeps_linear_layers_in_bf16_and_the_rest_in_fp32(tokenizer):
    policy = _tied(tokenizer)
    ref = frozen_copy(policy, precision_of("bf16-mixed"))
    for name, p in ref.named_parameters():
        linear = name.endswith("proj.weight") or name == "lm_head.weight"
        assert p.dtype == (torch.bfloat16 if linear else torch.float32), name
        assert not p.requires_grad
    assert ref.lm_head.weight is not ref.model.embed_tokens.weight  # untied: an fp32 table, a bf16 head
    assert torch.equal(ref.lm_head.weight, policy.lm_head.weight.detach().bfloat16())
    assert policy.lm_head.weight is policy.model.embed_tokens.weight  # the policy is untouched
    assert not ref.training
    assert {p.dtype for p in frozen_copy(policy, precision_of("32")).parameters()} == {torch.float32}
    tied = frozen_copy(policy, precision_of("32"))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_reference_forward_is_the_policys_value_for_value(tokenizer, precision):
    """At a step where policy == reference the margin is exactly 0: the same forward, the same numbers."""
    policy = _tied(tokenizer).eval()
    p = precision_of(precision)
    ref = FrozenReference.copy_of(policy, p).module
    g = torch.Generator().manual_seed(0)
    pairs = [[torch.randint(3, 300, (n,), generator=g).tolist() for n in lengths]
             for lengths in ([7, 11, 5], [4, 6, 9], [8, 3, 5])]
    with torch.no_grad(), p.autocast("cpu"):
        pol = pair_logprobs(policy, *pairs, pad_id=0)
        rf = pair_logprobs(ref, *pairs, pad_id=0)
    margin = (pol[0] - rf[0]) - (pol[1] - rf[1])
    assert torch.equal(margin, torch.zeros_like(margin))


def _weight_casts(model, precision) -> int:
    """Conversions of weight-shaped tensors while `model` decodes 6 tokens (the profiler sees every aten op)."""
    shapes = {tuple(w.shape) for w in model.parameters() if w.dim() == 2}
    with profile(record_shapes=True) as prof, precision.autocast("cpu"):
        decode_batch(model, [[5, 6, 7], [8, 9]], pad_id=0, stop_ids=[1], max_new_tokens=6, greedy=True)
    return sum(1 for e in prof.events()
               if e.name == "aten::_to_copy" and e.input_shapes and tuple(e.input_shapes[0]) in shapes)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16", "32"])
def test_generation_casts_no_weight(tokenizer, precision):
    p = precision_of(precision)
    policy = _tied(tokenizer).to(p.param_dtype)
    assert _weight_casts(FrozenReference.copy_of(policy, p).module, p) == 0
    if p.autocast_dtype is not None:  # what an fp32 reference did: a cast of every weight at every step
        assert _weight_casts(frozen_copy(policy, precision_of("32")), p) >= 6 * 8


def test_refresh_casts_the_policy_into_the_reference(tokenizer):
    policy = _tied(tokenizer)
    ref = FrozenReference.copy_of(policy, precision_of("bf16-mixed"))
    with torch.no_grad():
        for w in policy.parameters():
            w.add_(0.01)
    ref.refresh_from(policy)
    assert torch.equal(ref.module.lm_head.weight, policy.lm_head.weight.detach().bfloat16())
    assert torch.equal(ref.module.model.embed_tokens.weight, policy.model.embed_tokens.weight.detach())


def test_a_tied_checkpoint_loads_into_the_untied_mixed_reference(tokenizer):
    """Checkpoints hold a tied weight once (safetensors): the untied LM head is filled from the embedding."""
    from spinlm.model import parallel
    from spinlm.utils.checkpoint import _without_shared

    policy = _tied(tokenizer)
    saved = _without_shared(FrozenReference.copy_of(policy, precision_of("32")).state_dict())
    assert "lm_head.weight" not in saved
    ref = FrozenReference.copy_of(_tied(tokenizer), precision_of("bf16-mixed"))
    with torch.no_grad():
        ref.module.lm_head.weight.zero_()
    parallel.load_full_state_dict(ref.module, saved)
    assert torch.equal(ref.module.lm_head.weight, policy.lm_head.weight.detach().bfloat16())

