"""NeMo's Megatron-only config keys, accepted so that NeMo-Aligner's commands run unchanged.

A knob whose value changes nothing spinlm computes (a parallel size of 1, Megatron's precision and
optimizer-sharding switches) is accepted with one warning line: what it does in NeMo, what spinlm does
instead. A value that would change results in a way spinlm cannot reproduce (tensor or pipeline
parallelism above 1, ...) is a config error. null, the YAML's default, means not set: no warning.
`config` checks the knobs' types with the rest of the config.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from spinlm.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Knob:
    types: tuple[type, ...]            # the value's types (checked with the rest of the config)
    meaning: str                       # what NeMo does with it, and what spinlm does
    accepted: tuple[Any, ...] | None = None   # values that change nothing; None = any value
    otherwise: str = ""                # for another value: why not, and what to use instead


_BOOL, _INT, _NUMBER = (bool,), (int,), (int, float)
_PARALLEL = "spinlm keeps each layer whole in every process; shard with trainer.strategy=fsdp instead"

_DISTOPT = "a setting of Megatron's distributed optimizer; no effect here"

KNOBS: dict[str, Knob] = {
    "model.mcore_gpt": Knob(_BOOL, "NeMo builds Megatron Core's GPT; spinlm trains the Hugging Face model it loads"),
    "model.megatron_amp_O2": Knob(_BOOL, "Megatron keeps half-precision weights with an fp32 master copy; spinlm "
                                         "does that under trainer.precision=bf16 (NeMo-Aligner's default pair) and "
                                         "otherwise keeps the weights trainer.precision says"),
    "model.tensor_model_parallel_size": Knob(_INT, "1 = no tensor parallelism, as spinlm runs", (1,),
                                             f"tensor parallelism is not supported: {_PARALLEL}"),
    "model.pipeline_model_parallel_size": Knob(_INT, "1 = no pipeline parallelism, as spinlm runs", (1,),
                                               f"pipeline parallelism is not supported: {_PARALLEL}"),
    "model.virtual_pipeline_model_parallel_size": Knob(_INT, "1 = no interleaved pipeline, as spinlm runs", (1,),
                                                       "an interleaved pipeline is not supported"),
    "model.context_parallel_size": Knob(_INT, "1 = each sequence whole in one process, as spinlm runs", (1,),
                                        "context parallelism is not supported"),
    "model.expert_model_parallel_size": Knob(_INT, "1 = experts not split over processes, as spinlm runs", (1,),
                                             "expert parallelism is not supported"),
    "model.sequence_parallel": Knob(_BOOL, "Megatron splits activations under tensor parallelism; with "
                                           "tensor_model_parallel_size 1 it does nothing"),
    "model.optim.bucket_cap_mb": Knob(_NUMBER, _DISTOPT),
    "model.optim.overlap_grad_sync": Knob(_BOOL, _DISTOPT),
    "model.optim.contiguous_grad_buffer": Knob(_BOOL, _DISTOPT),
    "model.spin.offload_adam_states": Knob(_BOOL, "NeMo moves the Adam state to the CPU while it generates; "
                                                  "spinlm keeps it in place (same results)"),
    "model.data.num_workers": Knob(_INT, "spinlm tokenises the data before training; there are no loader workers"),
}

# NeMo's optimizer names that are AdamW's update (decoupled weight decay) under another implementation
ADAMW_ALIASES = {
    "distributed_fused_adam": "Megatron's AdamW with its state sharded over data-parallel ranks",
    "fused_adam": "Apex's fused AdamW",
}


def check_megatron_knobs(cfg: DictConfig) -> None:
    """Refuse knob values spinlm cannot honour; warn once per knob that is set but changes nothing."""
    notes = []
    for key, knob in KNOBS.items():
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        if knob.accepted is not None and value not in knob.accepted:
            raise ConfigError(f"config: {key}={value} is not supported: {knob.otherwise}; set it to "
                              f"{' or '.join(map(str, knob.accepted))} or leave it out")
        notes.append(f"{key}={value} accepted, changes nothing: {knob.meaning}")
    name = cfg.model.optim.name
    if name.lower() in ADAMW_ALIASES:
        notes.append(f"model.optim.name={name} runs as torch AdamW (the same update): NeMo's is "
                     f"{ADAMW_ALIASES[name.lower()]}")
    elif name.lower() != "adamw":
        raise ConfigError(f"config: model.optim.name must be adamw (or NeMo's {' / '.join(ADAMW_ALIASES)}, "
                          f"which run as AdamW), got {name!r}")
    if os.environ.get("RANK", "0") == "0":  # one copy of each line under torchrun
        for note in notes:
            log.warning(note)
