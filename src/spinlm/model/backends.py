"""Which backend samples the reference's answers: `model.spin.generation_backend`.

- `spinlm`: spinlm's cached decoder on the reference module, which also scores the reference's
  log-probs of both answers in the same pass (fastest on CPUs, see benchmarks/RESULTS.md);
- `hf`: Hugging Face ``generate`` on the reference module;
- `vllm`: a vLLM engine per rank, the reference's weights pushed in place before each generation
  (`model/vllm_engine.py`);
- `auto`: vllm when it is installed and training runs on CUDA, else spinlm.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from spinlm.errors import ConfigError
from spinlm.model.generation import DecoderBackend, GenerationBackend, HFGenerateBackend


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_backend(name: str, device: torch.device) -> str:
    """The backend `name` means on `device`; vllm when it is not installed is an error naming the key."""
    if name == "auto":
        return "vllm" if device.type == "cuda" and vllm_installed() else "spinlm"
    if name == "vllm" and not vllm_installed():
        from spinlm.model.vllm_engine import INSTALL

        raise ConfigError(f"config: model.spin.generation_backend=vllm needs vLLM, which is not installed: {INSTALL}")
    return name


def make_backend(cfg: DictConfig, tokenizer: Any, model: nn.Module, device: torch.device) -> GenerationBackend:
    """The configured backend; `model` (the policy, before wrapping) gives an engine its architecture."""
    name = resolve_backend(cfg.model.spin.generation_backend, device)
    batch_size = cfg.model.spin.rollout_micro_batch_size
    if name == "spinlm":
        return DecoderBackend(tokenizer, batch_size)
    if name == "hf":
        return HFGenerateBackend(tokenizer, batch_size)
    from spinlm.model.vllm_engine import EngineSettings, VLLMBackend

    return VLLMBackend(tokenizer, model, EngineSettings.from_config(cfg, device))
