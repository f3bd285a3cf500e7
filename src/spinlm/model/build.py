"""The policy and its reference on every rank, loaded so that no host holds more than one full copy.

- **One process**: the model loads from the checkpoint and moves to its device; a frozen reference
  is copied there (on a GPU the host copy is gone once the model has moved; on the CPU the policy
  and a frozen reference are both on the host, by necessity).
- **FSDP2** (`trainer.strategy=fsdp`): rank 0 alone reads the checkpoint. The other ranks build the
  model on the meta device (no memory), every rank shards it, and rank 0 broadcasts one tensor at a
  time, each rank keeping its shard (`set_model_state_dict(full_state_dict=True,
  broadcast_from_rank0=True)`); buffers follow. A frozen reference is sharded and filled the same way
  from the same host copy. Rank 0 holds one full copy until the shards are filled, the others never.
- **DDP**: rank 0 reads the checkpoint; the other ranks allocate the model on their device,
  uninitialised, and DDP's start copies rank 0's weights to them; a frozen reference is copied on
  the device and filled from rank 0 likewise. On GPUs no rank keeps a copy on its host (rank 0's is
  freed once the model has moved); on the CPU each rank holds its replica (and, without LoRA, the
  frozen reference): DDP replicates by definition.
- **A model in memory** (the Python API, `spinlm.api`): every rank holds it already; rank 0's
  weights reach the others as above, so every rank trains the same start model.
- **LoRA** (`model.peft.peft_scheme=lora`): the reference is the policy with its adapters off, so
  there is no second copy in any of these cases.
"""

from __future__ import annotations


import torch
from omegaconf import DictConfig
from torch import nn

from spinlm.model import lora, parallel
from spinlm.model.loading import adopt_model, load_model, load_model_skeleton
from spinlm.model.precision import Precision, frozen_copy, precision_of
from spinlm.model.recompute import apply_activation_checkpointing
from spinlm.model.reference import (
    FrozenReference,
    LoraReference,
    PolicyAsReference,
    ReferencePolicy,
    reference_kind,
)
from spinlm.utils.distributed import info


def build_models(
    cfg: DictConfig, tokenizer, strategy: str, device: torch.device, kernel: str, model: nn.Module | None = None,
    with_reference: bool = True,
) -> tuple[nn.Module, ReferencePolicy | None]:
    """(policy wrapped for `strategy` on `device`, its reference or None without `with_reference`: spinlm sft),
    from `pretrained_checkpoint.restore_from_path` or from `model` (in memory on every rank: the Python API),
    with the CPU linear `kernel` rank 0 chose (`train.choose_linear_kernel`)."""
    path = cfg.pretrained_checkpoint.restore_from_path
    trust = cfg.pretrained_checkpoint.trust_remote_code
    settings = lora.LoraSettings.from_config(cfg.model)
    precision = precision_of(cfg.trainer.precision)
    dtype = precision.param_dtype
    reads = info().is_main or model is not None  # the ranks that hold the weights (rank 0 reads the file)
    kind = None if not with_reference else reference_kind(  # None: spinlm sft
        precision, strategy, settings is not None, bool(cfg.model.spin.regenerate_each_epoch))

    def skeleton() -> nn.Module:
        source = path if model is None else model.config
        return load_model_skeleton(source, tokenizer, dtype, cpu_linear_kernel=kernel, trust_remote_code=trust)

    if model is not None:
        model = adopt_model(model, tokenizer, dtype, cpu_linear_kernel=kernel)
    elif reads:
        model = load_model(path, tokenizer, dtype, cpu_linear_kernel=kernel, trust_remote_code=trust)
    else:
        model = skeleton()
    if settings is not None:
        lora.add_adapters(model, settings)  # in the base's dtype (bf16: BF16AdamW keeps their exact master)
    apply_activation_checkpointing(model, cfg.model.activations_checkpoint_granularity,
                                   cfg.model.activations_checkpoint_method, cfg.model.activations_checkpoint_num_layers)
    if strategy == "fsdp":
        return _sharded(model, skeleton, settings, precision, device, reads, kind)
    if not reads:
        parallel.materialize(model, device)  # filled from rank 0 below
    model.to(device)
    if kind != "frozen":
        policy = parallel.wrap_policy(model, strategy, device)  # DDP: its start broadcasts rank 0's weights
        return policy, _sharing_reference(kind, policy, settings, precision)
    reference = FrozenReference.copy_of(model, precision)  # on the device, before DDP wraps the policy
    parallel.broadcast_from_rank0([*reference.module.parameters(), *reference.module.buffers()])
    return parallel.wrap_policy(model, strategy, device), reference  # DDP: its start broadcasts rank 0's weights


def _sharded(
    model: nn.Module, skeleton, settings: lora.LoraSettings | None, precision: Precision, device: torch.device,
    reads: bool, kind: str | None,
) -> tuple[nn.Module, ReferencePolicy | None]:
    full = model.state_dict() if reads else {}  # rank 0's one host copy, until every shard is filled
    policy = _filled_shards(model, full, device, allocated=reads)
    parallel.broadcast_from_rank0(policy.buffers())  # non-persistent ones (rotary tables) are not in `full`
    if kind != "frozen":
        return policy, _sharing_reference(kind, policy, settings, precision)
    # in the compute dtype, like the single-process copy (model/precision.py); filled (cast) from the same copy
    reference = _filled_shards(frozen_copy(skeleton(), precision), full, device, allocated=False)
    buffers = dict(policy.named_buffers())
    for name, buffer in reference.named_buffers():
        buffer.copy_(buffers[name])
    return policy, FrozenReference(reference)


def _sharing_reference(kind: str | None, policy: nn.Module, settings: lora.LoraSettings | None,
                       precision: Precision) -> ReferencePolicy | None:
    """A reference that holds no weights of its own (`reference_kind` "lora" or "policy"); None for spinlm sft."""
    if kind == "lora":
        return LoraReference(policy, settings)
    return PolicyAsReference(policy, precision) if kind == "policy" else None


def _filled_shards(module: nn.Module, full: dict, device: torch.device, allocated: bool) -> nn.Module:
    """`module` sharded (FSDP2), each rank's shards filled from rank 0's `full` state dict."""
    parallel.shard(module, device)
    if not allocated:
        parallel.materialize(module, device)
    parallel.load_full_state_dict(module, full)
    return module
