"""LoRA adapters (the `peft` library) on the policy, merged into the base weights at each SPIN iteration end.

NeMo's keys (`model.peft.lora_tuning`): `adapter_dim` is the rank r, `alpha` scales the update by
alpha / r (peft's lora_alpha), `adapter_dropout` drops the adapter's input (peft's lora_dropout) and
`target_modules` names the adapted linear layers, either by NeMo's names or by the model's own.
NeMo fuses q/k/v (and gate/up) into one layer with one adapter; Hugging Face models keep them
apart, so `attention_qkv` puts one adapter on each of q_proj, k_proj and v_proj (same rank).

The adapters are initialised as NeMo does (A xavier-normal, B zero, so a fresh adapter changes
nothing), from a generator seeded by `model.seed` and the number of merges so far: a resumed run
draws the same adapters. Merging adds (alpha / r) * B @ A to the base weight; under FSDP2 each
rank adds to the rows of W it holds (B is sharded by the same rows, A is all-gathered: r x in).

From a script (e.g. a benchmark's `lora` mode): the config overrides
    model.peft.peft_scheme=lora model.peft.lora_tuning.adapter_dim=16 model.peft.lora_tuning.target_modules=all
with `spinlm.train.build_trainer(spinlm.config.load_config(overrides))`; or, for a model built in the
script, `add_adapters(model, LoraSettings(16, 16.0, 0.0, ("all",), seed))` and
`spinlm.model.reference.LoraReference(model, settings)`. The same adapters in peft/TRL terms:
`LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
"up_proj", "down_proj"])`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib.util import find_spec
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from spinlm.config import lora_targets
from spinlm.errors import ConfigError
from spinlm.model.loading import unwrap
from spinlm.model.parallel import full_state_dict

ADAPTER = "default"  # peft's name for the one adapter
TARGETS_KEY = "model.peft.lora_tuning.target_modules"

# NeMo's names -> the layers they mean in Llama-style Hugging Face models (Llama, Mistral, Qwen2, SmolLM,
# Gemma; qkv_proj / gate_up_proj: Phi-3's fused layers)
NEMO_TARGETS: dict[str, tuple[str, ...]] = {
    "attention_qkv": ("q_proj", "k_proj", "v_proj", "qkv_proj"),
    "attention_dense": ("o_proj",),
    "mlp_fc1": ("gate_proj", "up_proj", "gate_up_proj"),
    "mlp_fc2": ("down_proj",),
}
NEMO_GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ("attention_qkv", "attention_dense"),
    "mlp": ("mlp_fc1", "mlp_fc2"),
    "all": tuple(NEMO_TARGETS),
}


@dataclass(frozen=True)
class LoraSettings:
    """model.peft.lora_tuning, as read from the config."""

    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]  # as configured: NeMo's names or the model's layer names
    seed: int  # model.seed: the adapters' initialisation

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, model_cfg: DictConfig) -> LoraSettings | None:
        """The settings (from the config's `model` node) under `peft.peft_scheme=lora`, else None."""
        if model_cfg.peft.peft_scheme != "lora":
            return None
        lora = model_cfg.peft.lora_tuning
        return cls(int(lora.adapter_dim), float(lora.alpha), float(lora.adapter_dropout),
                   tuple(lora_targets(lora)), int(model_cfg.seed))


def require_peft() -> None:
    if find_spec("peft") is None:
        raise ConfigError("config: model.peft.peft_scheme=lora needs the peft package: pip install 'spinlm[lora]'")


# ----- which layers ----------------------------------------------------------------------------
def _linear_names(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def resolve_targets(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """The layer names peft should adapt for `targets` (NeMo's names expanded); ConfigError naming the key
    when a target matches no linear layer of `model`, or a layer whose weight is tied to another's."""
    linears = _linear_names(model)
    leaves = sorted({name.rsplit(".", 1)[-1] for name in linears})
    resolved: list[str] = []
    for target in targets:
        nemo = [t for g in NEMO_GROUPS.get(target, (target,)) for t in NEMO_TARGETS.get(g, ())]
        candidates = nemo or [target]
        found = [c for c in candidates if any(n == c or n.endswith("." + c) for n in linears)]
        if not found:
            means = f" (NeMo's name for {'/'.join(candidates)})" if nemo else ""
            raise ConfigError(
                f"config: {TARGETS_KEY}: '{target}'{means} matches no linear layer of {type(model).__name__}; "
                f"its linear layers: {', '.join(leaves)}")
        resolved += [c for c in found if c not in resolved]
    _refuse_tied(model, linears, resolved)
    return resolved


def _refuse_tied(model: nn.Module, linears: dict[str, nn.Module], resolved: list[str]) -> None:
    """A merge into a weight shared with another module (a tied LM head) would change both."""
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    for name, m in linears.items():
        if any(name == c or name.endswith("." + c) for c in resolved) and owners.get(id(m.weight), 0) > 1:
            raise ConfigError(f"config: {TARGETS_KEY}: {name} shares its weight with another layer (tied "
                              "embeddings); LoRA cannot adapt it")


def check_targets(model_config: Any, settings: LoraSettings, trust_remote_code: bool = False) -> list[str]:
    """`resolve_targets` on the model `model_config` describes, built on the meta device (no weights, no
    memory): bad targets fail before anything loads."""
    from transformers import AutoModelForCausalLM

    require_peft()
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    return resolve_targets(skeleton, settings.targets)


# ----- adapters on a model -----------------------------------------------------------------------
def add_adapters(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Adapters on `model`'s target layers, in place; the base weights frozen, the adapters fresh
    (`fresh_adapters`, merge count 0). The global RNG is left as it was."""
    require_peft()
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=resolve_targets(model, settings.targets), bias="none")
    with torch.random.fork_rng(devices=[]):  # peft's own init draws from the global RNG; ours below does not
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    fresh_adapters(model, settings, merges=0)
    return model


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every LoRA layer, in module order; [] without peft or adapters."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return []
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def _local(t: Tensor) -> Tensor:
    """The part of a parameter this rank holds (the whole tensor unless sharded by FSDP2)."""
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def fresh_adapters(model: nn.Module, settings: LoraSettings, merges: int) -> None:
    """A ~ xavier-normal, B = 0 in every layer (NeMo's init): from a generator seeded by model.seed and
    `merges`, drawn in module order, so every rank and every resume draws the same."""
    gen = torch.Generator().manual_seed(settings.seed + 1_000_003 * (merges + 1))
    for _, layer in lora_layers(model):
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        if a.is_meta:  # a rank that receives its weights by broadcast
            continue
        full = torch.nn.init.xavier_normal_(torch.empty(a.shape, dtype=torch.float32), generator=gen)
        if hasattr(a, "device_mesh"):  # FSDP2: this rank's rows of the same draw
            from torch.distributed.tensor import distribute_tensor

            full = distribute_tensor(full.to(a.device), a.device_mesh, a.placements, src_data_rank=None)
        _local(a).copy_(_local(full))
        _local(b).zero_()


@torch.no_grad()
def merge_adapters(model: nn.Module, scaling: float) -> None:
    """W += scaling * B @ A in every LoRA layer (the adapters stay: start fresh ones after)."""
    for _, layer in lora_layers(model):
        a = layer.lora_A[ADAPTER].weight
        a = a.full_tensor() if hasattr(a, "full_tensor") else a  # r x in: small
        b, w = _local(layer.lora_B[ADAPTER].weight), _local(layer.base_layer.weight)  # the same rows of W
        w.copy_(_merged(w, b, a, scaling))


def _merged(w: Tensor, b: Tensor, a: Tensor, scaling: float) -> Tensor:
    """w + scaling * b @ a, summed in fp32 whatever the weights' dtype (one formula for merges and export).
    Into a bf16 w the sum is rounded to bf16: a change below half a bf16 step of w is lost at the merge."""
    return (w.float() + (b.float() @ a.float()) * scaling).to(w.dtype)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """The base model's forward: every adapter off for the duration (peft's switch; on again after)."""
    layers = [m for _, m in lora_layers(model)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


# AdamW's state, and BF16AdamW's remainder of the master weight (trainer.precision=bf16): zeroed, the master is
# the fresh bf16 adapter exactly
_ADAM_STATE = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_low")


def reset_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """AdamW's state zeroed in place: a fresh state (step 0, zero moments) that, unlike an empty one,
    survives torch's distributed optimizer state dict unchanged (it steps an empty state once to fill it).
    A state entry Adam does not have (e.g. master weights) is an error, not silently zeroed."""
    for state in optimizer.state.values():
        for key, value in list(state.items()):
            if key not in _ADAM_STATE:
                raise TypeError(f"cannot reset optimizer state {key!r} for fresh LoRA adapters (only {_ADAM_STATE})")
            state[key] = value.zero_() if isinstance(value, Tensor) else type(value)(0)


# ----- state dicts under Hugging Face's names ----------------------------------------------------
def _split(name: str) -> tuple[str, str] | None:
    """'x.q_proj.lora_A.default.weight' -> ('x.q_proj', 'A'); None for any other name."""
    for part in ("A", "B"):
        marker = f".lora_{part}.{ADAPTER}.weight"
        if name.endswith(marker):
            return name[: -len(marker)], part
    return None


def base_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The base model's weights under plain Hugging Face names (adapters dropped, '.base_layer' removed)."""
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if _split(k) is None}


def merged_state_dict(state: Mapping[str, Tensor], scaling: float) -> dict[str, Tensor]:
    """The policy as a plain Hugging Face state dict: each adapter merged into its base weight."""
    adapters: dict[str, dict[str, Tensor]] = {}
    for k, v in state.items():
        if (split := _split(k)) is not None:
            adapters.setdefault(split[0], {})[split[1]] = v
    out = base_state_dict(state)
    for layer, ab in adapters.items():
        out[f"{layer}.weight"] = _merged(out[f"{layer}.weight"], ab["B"], ab["A"], scaling)
    return out


def hf_state_dict(policy: nn.Module) -> dict[str, Tensor]:
    """The policy's full weights as a plain Hugging Face state dict, adapters merged (what `final/` holds).
    Under torchrun a collective: rank 0 gets the tensors."""
    state = full_state_dict(policy)
    layers = lora_layers(unwrap(policy))
    return merged_state_dict(state, layers[0][1].scaling[ADAPTER]) if layers else state


def layout(model_cfg: DictConfig) -> dict[str, Any]:
    """What a checkpoint's tensors depend on: resuming under other LoRA settings is refused by name."""
    settings = LoraSettings.from_config(model_cfg)
    if settings is None:
        return {"model.peft.peft_scheme": "none"}
    return {"model.peft.peft_scheme": "lora", "model.peft.lora_tuning.adapter_dim": settings.rank,
            "model.peft.lora_tuning.alpha": settings.alpha, TARGETS_KEY: list(settings.targets)}
