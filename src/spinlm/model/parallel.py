"""Data parallel (DDP) and sharded (FSDP2) models, and full state dicts that do not depend on either.

- DDP: every rank holds the whole model; gradients are averaged in backward.
- FSDP2 (`torch.distributed.fsdp.fully_shard`): each decoder layer is one shard group and the
  root module (embeddings, final norm, LM head) another; parameters, gradients and optimizer
  state live sharded, a layer's weights are all-gathered just for its forward/backward. The
  frozen reference policy is sharded the same way, so no rank ever holds a full copy of it.

Checkpoints and the final export use *full* state dicts (torch.distributed.checkpoint.state_dict
with full_state_dict=True, cpu_offload=True): plain parameter-name -> tensor maps, for the
model and for the optimizer (keyed by parameter name, not position). So a checkpoint written by
2 FSDP ranks resumes on 1 process or on 4 DDP ranks, and `final/` is an ordinary HF directory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from spinlm.config import STRATEGIES
from spinlm.errors import ConfigError
from spinlm.model.loading import unwrap
from spinlm.utils.distributed import info


def resolve_strategy(strategy: str, world_size: int) -> str:
    """`trainer.strategy` -> "single", "ddp" or "fsdp". auto = ddp with more than one process."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"config: trainer.strategy must be one of {STRATEGIES}, got {strategy!r}")
    if world_size <= 1:
        return "single"
    return "ddp" if strategy == "auto" else strategy


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: modules whose class HF marks as not to be split (`_no_split_modules`),
    else the children of the longest ModuleList."""
    names = set(getattr(unwrap(model), "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def shard(model: nn.Module, device: torch.device) -> nn.Module:
    """FSDP2 in place: one group per decoder layer, then the root. Call on the CPU model: each
    rank then moves only its own shard to `device` (a full copy never lands on the GPU)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (info().world_size,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def wrap_policy(model: nn.Module, strategy: str, device: torch.device) -> nn.Module:
    """The trainable policy for `strategy` ("single", "ddp" or "fsdp"), on `device`."""
    if strategy == "fsdp":
        return shard(model, device)
    model.to(device)
    if strategy == "ddp":
        # buffers (rotary tables) are constants: no broadcast per forward
        ids = [device.index] if device.type == "cuda" else None
        # gradients as views into the all-reduce buckets: no second copy of them
        return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False, gradient_as_bucket_view=True)
    return model


def materialize(module: nn.Module, device: torch.device) -> nn.Module:
    """A meta-device module's tensors allocated on `device`, uninitialised (a broadcast fills them), with
    tied parameters tied again (`to_empty` gives each name its own tensor). Works on FSDP2 shards too."""
    tied = [names for names in _parameter_names(module).values() if len(names) > 1]
    module.to_empty(device=device)
    for first, *others in tied:
        shared = module.get_parameter(first)
        for name in others:
            owner, _, attr = name.rpartition(".")
            setattr(module.get_submodule(owner), attr, shared)
    return module


def _parameter_names(module: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every name it has (several for tied weights)."""
    groups: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return groups


def broadcast_from_rank0(tensors: Iterable[Tensor]) -> None:
    """Rank 0's values copied into every rank's `tensors`, in place; nothing in one process."""
    if info().is_distributed:
        for t in tensors:
            torch.distributed.broadcast(t.data, src=0)


def needs_lockstep(model: nn.Module) -> bool:
    """FSDP2 forwards are collectives: every rank must run the same number of them."""
    return is_sharded(model) and info().is_distributed


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """FSDP2: every shard of `module` all-gathered for the duration (a full copy per rank, freed
    after), so its forwards involve no collective and ranks may run different numbers of them
    (generation: each rank decodes its own batches, stopping when they are done)."""
    if not needs_lockstep(module):
        yield
        return
    groups = [m for m in module.modules() if isinstance(m, FSDPModule)]
    module.set_reshard_after_forward(False)
    for m in groups:
        m.unshard()
    try:
        yield
    finally:
        for m in groups:
            m.reshard()
        module.set_reshard_after_forward(True)


def grad_sync(model: nn.Module, enabled: bool):
    """DDP: skip the gradient all-reduce on accumulation micro batches (`enabled=False`).
    FSDP2 reduce-scatters every micro batch (keeps gradients sharded: memory before speed)."""
    if not enabled and isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


# ----- full state dicts --------------------------------------------------------------------
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered to rank 0, on CPU


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Parameter name -> full CPU tensor (no wrapper prefixes). Under FSDP2 a collective: call on
    every rank; only rank 0 gets the tensors (the others get {}), which is the rank that saves."""
    if not info().is_distributed:
        return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    return get_model_state_dict(model, options=_FULL)


def load_full_state_dict(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load a full state dict into a plain, DDP or FSDP2 model; strict. Under torchrun only rank 0's
    `state` is read (the others may pass {}): it is broadcast a tensor at a time, each rank keeping
    its shard, so no other rank needs a full copy on its host. A tied weight saved once (safetensors
    drops duplicates) is filled in from its partner."""
    state = with_tied_names(unwrap(model), state)
    if not info().is_distributed:
        unwrap(model).load_state_dict(state, strict=True)
        return
    options = StateDictOptions(full_state_dict=True, strict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, state if info().is_main else {}, options=options)


def with_tied_names(model: nn.Module, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`state` plus entries for every name sharing a parameter with one present."""
    out = dict(state)
    for names in [*_parameter_names(model).values(), _declared_embedding_tie(model)]:
        present = [n for n in names if n in out]
        for n in names:
            if n not in out and present:
                out[n] = out[present[0]]
    return out


def _declared_embedding_tie(model: nn.Module) -> list[str]:
    """The names of a Hugging Face model's input and output embeddings when its config ties them, even where a
    copy keeps them apart (the mixed-precision reference unties its LM head: model/precision.py)."""
    inner = unwrap(model)
    if not getattr(getattr(inner, "config", None), "tie_word_embeddings", False):
        return []
    try:
        ends = {id(inner.get_input_embeddings().weight), id(inner.get_output_embeddings().weight)}
    except (AttributeError, NotImplementedError):
        return []
    return [name for name, p in inner.named_parameters(remove_duplicate=False) if id(p) in ends]


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Optimizer state keyed by parameter name (resumable on another world size or strategy).
    A collective under FSDP2/DDP; only rank 0 gets the tensors."""
    options = _FULL if info().is_distributed else StateDictOptions(full_state_dict=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """The inverse of `full_optimizer_state_dict`. Under torchrun only rank 0's `state` is read (the
    others may pass {}): it is broadcast a tensor at a time, each rank keeping its shard."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=info().is_distributed)
    set_optimizer_state_dict(model, optimizer, state if info().is_main else {}, options=options)
