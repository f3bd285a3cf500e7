"""Activation checkpointing (recomputation) under NeMo's keys, on transformers' per-layer checkpointing and torch's
selective activation checkpointing.

`model.activations_checkpoint_granularity`:
- `null`: off; every activation of the training forward is kept for backward.
- `full`: decoder layers keep only their input; backward runs each layer's forward again. With
  `activations_checkpoint_method`:
  - `uniform` (or null): every layer. `activations_checkpoint_num_layers` must be 1 or null: transformers
    recomputes one layer at a time (Megatron's chunks of N layers have no equivalent there).
  - `block`: the first `activations_checkpoint_num_layers` layers only; the others keep their activations
    (less recomputation when memory allows).
- `selective`: every decoder layer under torch's selective activation checkpointing: the outputs of matrix
  products and attention kernels are kept, the cheap elementwise work (norms, activation functions, rotary
  embeddings, residual adds, casts) is recomputed in backward. This is NeMo AutoModel's `selective`, the per-op
  form of Megatron's (recompute what is large to keep but cheap to compute).

Recomputation happens in training forwards only: reference log-probs, generation and validation (no grad)
run as before. It is exact: the recomputed forward runs the same operations (dropout replays its RNG), so
losses and gradients equal a run without it. It works on the packed pair path and under FSDP2 (transformers
checkpoints a layer's `forward`, so FSDP2's hooks stay outside the recomputed region).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from spinlm.errors import ConfigError
from spinlm.model.loading import unwrap
from spinlm.model.parallel import decoder_layers

_GRANULARITY_KEY = "model.activations_checkpoint_granularity"


def _saved_ops() -> set:
    """Ops whose outputs selective checkpointing keeps: matrix products and attention kernels."""
    aten = torch.ops.aten
    names = ["mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_cudnn_attention"]
    ops = {getattr(aten, n).default for n in names if hasattr(aten, n)}
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):  # spinlm's oneDNN linear layers (model/kernels.py)
        ops.add(torch.ops.mkldnn._linear_pointwise.default)
    return ops


def _keep_products(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_keep_products)


_SAVED_OPS = _saved_ops()


def checkpointed_layers(num_layers: int, granularity: str | None, method: str | None, block_layers: int | None) -> int:
    """How many of `num_layers` decoder layers the keys checkpoint (the first ones)."""
    if granularity is None:
        return 0
    if granularity == "full" and method == "block":
        return min(block_layers or 0, num_layers)
    return num_layers


def apply_activation_checkpointing(model: nn.Module, granularity: str | None, method: str | None = None,
                                   num_layers: int | None = None) -> int:
    """Enable recomputation on `model` (a Hugging Face causal LM, before FSDP/DDP wrapping); returns how many
    decoder layers recompute. The keys were validated by `config.validate_memory_keys`."""
    if granularity is None:
        return 0
    inner = unwrap(model)
    kwargs = {"use_reentrant": False}
    if granularity == "selective":
        kwargs["context_fn"] = _selective_contexts
    try:
        if hasattr(inner, "activation_checkpointing_enable"):
            inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # transformers < 5.25 (e.g. 5.19, vLLM's pin) names it gradient checkpointing
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    except (AttributeError, ValueError) as e:
        raise ConfigError(f"config: {_GRANULARITY_KEY}={granularity}: this model does not support activation "
                          f"checkpointing ({type(inner).__name__}); set it to null") from e
    # the embedding hook transformers adds is for reentrant checkpointing of frozen models: not needed here
    inner.disable_input_require_grads()
    layers = decoder_layers(inner)
    count = checkpointed_layers(len(layers), granularity, method, num_layers)
    for layer in layers[count:]:
        layer.gradient_checkpointing = False
    return count
