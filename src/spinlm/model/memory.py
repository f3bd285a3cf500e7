"""The memory a run needs per rank, estimated from the model's config before any weight loads.

`estimate` counts the parameters on a meta-device model (no memory, exact counts, tied weights once) and adds:
- what lives all run, in bytes per parameter (`Precision.bytes_per_param`): the policy's weights, its
  gradients, AdamW's state and, where the run keeps one (`model/reference.py`), the frozen reference copy
  (its bytes counted on the meta model too), divided by the ranks under FSDP2;
- the larger of two phases:
  - the train step on the longest micro batch (its packed rows: prompt, ground-truth answer and
    `length_params.max_length` generated tokens): activations per token and decoder layer, a * hidden +
    b * intermediate bytes (a, b measured on transformers' Llama layers with SDPA: the tensors autograd
    saves); under full recomputation only each layer's input plus one layer being recomputed; under
    selective recomputation the matrix products' outputs. Plus the log-softmax over the answer tokens'
    logits, and under autocast the low-precision copies of the weights it keeps for backward;
  - generation: the KV cache of one rollout batch (allocated for the whole answer; scoring the ground-truth
    answers on it copies rows of it), the logits, under FSDP2 the all-gathered reference (every rank
    decodes with a full copy), and under mixed precision without a kept copy the reference's
    compute-dtype copy made for the generation.
Gradients are freed after each optimizer step (`spin.py`), except DDP's buckets, which live all run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from spinlm.errors import ConfigError
from spinlm.model import lora
from spinlm.model.loading import load_model_config
from spinlm.model.precision import Precision, frozen_copy, precision_of
from spinlm.model.recompute import checkpointed_layers
from spinlm.model.reference import reference_kind
from spinlm.utils.distributed import info

log = logging.getLogger(__name__)

GiB = 1024**3
# bytes autograd keeps per token and decoder layer, as (per hidden unit, per intermediate unit), measured on
# transformers' LlamaDecoderLayer (SDPA) for each compute mode (tests/model/test_memory.py re-measures them)
ACTIVATION_BYTES = {"fp32": (40.0, 16.6), "mixed": (34.0, 8.3), "bf16": (24.0, 8.3)}
# bytes per (answer token x vocabulary entry) around the log-softmax: kept for backward, plus its transients
LOGIT_BYTES = 12
# bytes per (row x vocabulary entry) of a decoding step's logits and sampling work
SAMPLING_BYTES = 20
# bytes per (answer token x vocabulary entry) when decoding scores the ground-truth answers: logits, fp32 copy, logsumexp
SCORING_BYTES = 10
ANSWER_TOKENS_PER_PASS = 1024  # model/decoding.py scores ground-truth answers this many tokens at a time


@dataclass
class Workload:
    """The sizes that set the activation and generation memory (from the config and the training data)."""

    micro_batch_size: int
    row_tokens: int  # the longest packed row: prompt + ground-truth answer + max new tokens
    answer_tokens: int  # the longest ground-truth answer
    mean_answer_tokens: float  # the ground-truth answers' mean length (decoding scores a batch of them)
    rollout_batch: int  # prompts decoded together
    prompt_tokens: int  # the longest prompt
    new_tokens: int  # max new tokens per answer


@dataclass
class MemoryEstimate:
    parameters: int
    precision: str
    ranks: int  # ranks sharing the weights (FSDP2), else 1
    per_param: dict[str, float]  # bytes per parameter per rank, by holder
    train_extra: dict[str, float] = field(default_factory=dict)  # bytes per rank in the train step
    generation_extra: dict[str, float] = field(default_factory=dict)  # bytes per rank during generation
    gradients_freed: bool = True  # between steps; False under DDP (its gradient buckets live all run)

    @property
    def bytes_per_param(self) -> float:
        return sum(self.per_param.values())

    @property
    def static_bytes(self) -> float:
        return self.bytes_per_param * self.parameters

    @property
    def peak_bytes(self) -> float:
        """The static part plus the larger phase (generation runs without the gradients, when they are freed)."""
        gradients = self.per_param["gradients"] * self.parameters if self.gradients_freed else 0.0
        return self.static_bytes + max(sum(self.train_extra.values()), sum(self.generation_extra.values()) - gradients)

    def line(self) -> str:
        parts = ", ".join(f"{k} {v:.3g}" for k, v in self.per_param.items())
        train = ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.train_extra.items())
        gen = ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.generation_extra.items())
        ranks = f" per rank ({self.ranks} FSDP2 ranks)" if self.ranks > 1 else ""
        return (f"memory estimate: {self.parameters / 1e6:.1f}M parameters, precision {self.precision}: "
                f"{self.bytes_per_param:.3g} B/param{ranks} ({parts}) = {self.static_bytes / GiB:.2f} GiB; "
                f"expected peak {self.peak_bytes / GiB:.2f} GiB per rank (train step + {train} GiB; "
                f"generation + {gen} GiB)")


def meta_model(config: PretrainedConfig, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model built on the meta device: shapes and tying, no memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def estimate(config: PretrainedConfig, precision: Precision, strategy: str, world_size: int, work: Workload,
             checkpointing: tuple[str | None, str | None, int | None] = (None, None, None),
             trust_remote_code: bool = False, lora: tuple[int, Sequence[str]] | None = None,
             regenerate_each_epoch: bool = False) -> MemoryEstimate:
    """Bytes per rank of a run (see the module docstring). `strategy`: single, ddp or fsdp. `lora`: (rank, the
    names of the linear layers that get adapters). `regenerate_each_epoch`: full fine-tuning keeps a frozen
    reference copy (`reference_kind`); otherwise the policy is the reference, plus under mixed precision a
    compute-dtype copy while generating."""
    model = meta_model(config, trust_remote_code).to(precision.param_dtype)
    params = sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    ranks = world_size if strategy == "fsdp" else 1
    kind = reference_kind(precision, strategy, lora is not None, regenerate_each_epoch)
    if lora is None:
        per_param = {k: v / ranks for k, v in precision.bytes_per_param().items()}
        reference = sum(p.numel() * p.dtype.itemsize for p in frozen_copy(model, precision).parameters())
        per_param["reference"] = reference / params / ranks if kind == "frozen" else 0.0
    else:
        adapters = lora_parameters(model, *lora)
        per_param = {k: v / ranks for k, v in lora_bytes_per_param(precision, adapters / params).items()}
        reference = params * precision.param_dtype.itemsize  # the base weights, gathered to decode under FSDP2
    shapes = _shapes(config)
    name = precision.name if lora is None else f"{precision.name} + LoRA r={lora[0]}"
    est = MemoryEstimate(params, name, ranks, per_param, gradients_freed=strategy != "ddp")
    est.train_extra = _train_step(shapes, precision, work, checkpointing, linear)
    est.generation_extra = _generation(shapes, precision, work, reference, ranks)
    if kind == "policy" and precision.autocast_dtype is not None:  # PolicyAsReference.active()'s copy
        est.generation_extra["reference copy"] = reference
    return est


def lora_parameters(model: torch.nn.Module, rank: int, targets: Sequence[str]) -> int:
    """Adapter parameters: rank x (in + out) for each linear layer named by `targets` (a full name or its last
    part, as peft matches them)."""
    return sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets))


def lora_bytes_per_param(precision: Precision, adapter_fraction: float) -> dict[str, float]:
    """LoRA (model.peft): the frozen base in the policy's dtype, no reference copy (the base is the reference);
    the adapters (`adapter_fraction` of the base's parameters) with their gradients and optimizer state."""
    full = precision.bytes_per_param()
    return {"weights": full["weights"], "adapters": full["weights"] * adapter_fraction,
            "gradients": full["gradients"] * adapter_fraction, "optimizer": full["optimizer"] * adapter_fraction,
            "reference": 0.0}


@dataclass
class _Shapes:
    hidden: int
    intermediate: int
    layers: int
    kv_dim: int
    vocab: int


def _shapes(config: PretrainedConfig) -> _Shapes:
    hidden = _first(config, ("hidden_size", "n_embd", "d_model"))
    heads = _first(config, ("num_attention_heads", "n_head"), 1)
    kv_heads = _first(config, ("num_key_value_heads",), heads)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return _Shapes(hidden, _first(config, ("intermediate_size", "n_inner"), 4 * hidden) or 4 * hidden,
                   _first(config, ("num_hidden_layers", "n_layer")), kv_heads * head_dim, config.vocab_size)


def _first(config: PretrainedConfig, names: tuple[str, ...], default: int | None = None) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    if default is None:
        raise ConfigError(f"cannot estimate memory: the model config has none of {', '.join(names)}")
    return default


def _mode(precision: Precision) -> str:
    if precision.autocast_dtype is not None:
        return "mixed"
    return "bf16" if precision.is_bf16 else "fp32"


def _train_step(s: _Shapes, precision: Precision, work: Workload, checkpointing, linear_params: int
                ) -> dict[str, float]:
    granularity, method, block = checkpointing
    tokens = work.micro_batch_size * work.row_tokens
    a, b = ACTIVATION_BYTES[_mode(precision)]
    layer = (a * s.hidden + b * s.intermediate) * tokens  # one layer's kept activations
    recomputed = checkpointed_layers(s.layers, granularity, method, block)
    residual = 2 if precision.is_bf16 else 4
    compute = precision.compute_dtype.itemsize
    if granularity == "selective":  # the matrix products' and attention's outputs, plus the layer input
        kept = ((4 * s.hidden + 2 * s.kv_dim + 2 * s.intermediate) * compute + s.hidden * residual) * tokens
    else:
        kept = s.hidden * residual * tokens
    # backward runs from the last layer: a recomputed layer's full activations only coexist with the kept
    # inputs and the layers before it, which block recomputation checkpoints first
    full_layers = max(s.layers - recomputed, 1 if recomputed else 0)
    activations = full_layers * layer + recomputed * kept
    answers = work.micro_batch_size * (work.answer_tokens + work.new_tokens)  # the positions whose logits are kept
    extra = {"activations": activations, "logits": LOGIT_BYTES * answers * s.vocab}
    if precision.autocast_dtype is not None:
        extra["autocast weight copies"] = compute * linear_params  # unsharded, even under FSDP2
    return extra


def _generation(s: _Shapes, precision: Precision, work: Workload, reference_bytes: int, ranks: int) -> dict[str, float]:
    compute = precision.compute_dtype.itemsize
    length = work.prompt_tokens + work.new_tokens
    scored = min(ANSWER_TOKENS_PER_PASS, work.rollout_batch * work.mean_answer_tokens)
    # scoring the ground-truth answers copies the cache rows of a chunk of prompts: up to a second cache
    extra = {"KV cache": 2 * 2 * s.layers * s.kv_dim * compute * work.rollout_batch * length,
             "logits": s.vocab * (SCORING_BYTES * scored + SAMPLING_BYTES * work.rollout_batch)}
    if ranks > 1:
        extra["gathered reference"] = reference_bytes * (1 - 1 / ranks)
    return extra


def check_fits(est: MemoryEstimate, device: torch.device, keys: str) -> None:
    """On CUDA: a ConfigError naming `keys` when the expected peak exceeds the device's memory."""
    if device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    if est.peak_bytes > total:
        raise ConfigError(
            f"config: the expected peak of {est.peak_bytes / GiB:.1f} GiB per rank exceeds the {total / GiB:.1f} GiB "
            f"of {device} ({est.parameters / 1e9:.2f}B parameters at {est.bytes_per_param:.3g} B/param); {keys}"
        )


def workload_of(cfg, samples: list[dict]) -> Workload:
    """The sizes of `cfg`'s run on its training samples (dicts with prompt_ids and answer_ids)."""
    new = cfg.model.spin.length_params.max_length
    longest = max(samples, key=lambda s: len(s["prompt_ids"]) + len(s["answer_ids"]))
    return Workload(
        micro_batch_size=cfg.model.micro_batch_size,
        row_tokens=len(longest["prompt_ids"]) + len(longest["answer_ids"]) + new,
        answer_tokens=max(len(s["answer_ids"]) for s in samples),
        mean_answer_tokens=sum(len(s["answer_ids"]) for s in samples) / len(samples),
        rollout_batch=cfg.model.spin.rollout_micro_batch_size,
        prompt_tokens=max(len(s["prompt_ids"]) for s in samples),
        new_tokens=new,
    )


def _keys_to_lower(cfg) -> str:
    m = cfg.model
    keys = [f"trainer.precision=bf16 (now {cfg.trainer.precision})" if str(cfg.trainer.precision) != "bf16" else None,
            None if m.activations_checkpoint_granularity == "full" else "model.activations_checkpoint_granularity=full",
            f"model.micro_batch_size (now {m.micro_batch_size})",
            f"model.spin.rollout_micro_batch_size (now {m.spin.rollout_micro_batch_size})",
            "trainer.strategy=fsdp over more GPUs (trainer.devices, trainer.num_nodes)",
            None if m.peft.peft_scheme == "lora" else "model.peft.peft_scheme=lora"]
    return "to fit, set " + "; ".join(k for k in keys if k)


def estimate_run(cfg, samples: list[dict], strategy: str, world_size: int,
                 model_config: PretrainedConfig | None = None) -> MemoryEstimate:
    """`estimate` of the run `cfg` describes: its precision, recomputation keys, LoRA adapters and data."""
    m = cfg.model
    trust = bool(cfg.pretrained_checkpoint.trust_remote_code)
    config = model_config or load_model_config(cfg.pretrained_checkpoint.restore_from_path, trust)
    settings = lora.LoraSettings.from_config(m)
    adapters = None if settings is None else (settings.rank, lora.resolve_targets(meta_model(config, trust),
                                                                                   settings.targets))
    return estimate(config, precision_of(cfg.trainer.precision), strategy, world_size, workload_of(cfg, samples),
                    (m.activations_checkpoint_granularity, m.activations_checkpoint_method,
                     m.activations_checkpoint_num_layers), trust, lora=adapters,
                    regenerate_each_epoch=bool(m.spin.regenerate_each_epoch))


def report(cfg, samples: list[dict], strategy: str, world_size: int, device: torch.device,
           model_config: PretrainedConfig | None = None) -> MemoryEstimate:
    """Estimate `cfg`'s run before its weights load (`model_config`: a model in memory's, else read from
    pretrained_checkpoint): one log line; on CUDA, a ConfigError when it cannot fit."""
    est = estimate_run(cfg, samples, strategy, world_size, model_config)
    if info().is_main:
        log.info("%s", est.line())
    check_fits(est, device, _keys_to_lower(cfg))
    return est
