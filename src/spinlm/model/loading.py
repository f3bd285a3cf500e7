"""Load a causal LM + tokenizer from a Hugging Face directory or a GGUF file, and export one back.

GGUF files are de-quantised to plain float weights on load (transformers does the conversion),
so everything downstream trains an ordinary ``PreTrainedModel`` and exports safetensors.

Loading a model runs none of its code: ``trust_remote_code`` is passed as False unless the
caller allows it (``pretrained_checkpoint.trust_remote_code``, ``spinlm evaluate
--trust-remote-code``), and a directory whose config.json or tokenizer_config.json asks for its
own Python classes (``auto_map``) is refused with a ConfigError instead of silently getting a
built-in class. ``pytorch_model.bin`` weights load with ``weights_only=True``; GGUF files are
parsed as data (gguf's reader: numpy memmap of the tensor blocks, typed metadata fields).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from spinlm.errors import ConfigError
from spinlm.model.kernels import contiguous_head_input, use_onednn_linears

CONFIG_KEY = "pretrained_checkpoint.restore_from_path"
TRUST_KEY = "pretrained_checkpoint.trust_remote_code"
# files whose `auto_map` makes transformers import Python code from the model directory
_CODE_MAPS = ("config.json", "tokenizer_config.json")

# Config attributes different architectures use for the maximum sequence length, in order of preference.
_CONTEXT_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def load_pretrained(
    path: str | Path, torch_dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model and its tokenizer; a missing pad token becomes eos (we right-pad with eos)."""
    tokenizer = load_tokenizer(path, trust_remote_code)
    return load_model(path, tokenizer, torch_dtype, trust_remote_code=trust_remote_code), tokenizer


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer alone (cheap): data can be checked before the weights load."""
    return _from_pretrained(AutoTokenizer, path, "a tokenizer", trust_remote_code)


def load_model_config(path: str | Path, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config alone (cheap): its context length is known before the weights load."""
    return _from_pretrained(AutoConfig, path, "a model config", trust_remote_code)


def load_model(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, torch_dtype: torch.dtype = torch.float32,
    cpu_linear_kernel: str = "auto", trust_remote_code: bool = False,
) -> PreTrainedModel:
    """The weights; gives `tokenizer` a pad token (eos) if it has none and makes the model agree.

    Linear layers run fp32 CPU products through oneDNN where it is faster (`use_onednn_linears`).
    """
    model = _from_pretrained(AutoModelForCausalLM, path, "a causal LM", trust_remote_code, dtype=torch_dtype,
                             weights_only=True)
    return adopt_model(model, tokenizer, torch_dtype, cpu_linear_kernel)


def adopt_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, torch_dtype: torch.dtype = torch.float32,
    cpu_linear_kernel: str = "auto",
) -> PreTrainedModel:
    """What `load_model` does to weights it loaded, for a model already in memory (the Python API):
    floating weights in `torch_dtype` (in place), a pad token, the CPU linear kernel."""
    if any(p.is_floating_point() and p.dtype != torch_dtype for p in model.parameters()):
        model.to(torch_dtype)
    _drop_gguf_quantizer(model)
    _ensure_pad_token(model, tokenizer)
    use_onednn_linears(model, cpu_linear_kernel)
    contiguous_head_input(model)
    return model


def load_model_skeleton(
    source: str | Path | PretrainedConfig, tokenizer: PreTrainedTokenizerBase, torch_dtype: torch.dtype = torch.float32,
    cpu_linear_kernel: str = "auto", trust_remote_code: bool = False,
) -> PreTrainedModel:
    """`load_model`'s model without its weights: every tensor on the meta device (no memory, no read of
    the weights file), from a model directory or a model's config. Under torchrun the ranks that do not
    read the checkpoint build this and receive the weights from rank 0."""
    config = source if isinstance(source, PretrainedConfig) else load_model_config(source, trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    _ensure_pad_token(model, tokenizer)
    use_onednn_linears(model, cpu_linear_kernel)
    contiguous_head_input(model)
    return model


def _from_pretrained(auto_cls, path: str | Path, what: str, trust_remote_code: bool, **extra):
    source, kwargs = _from_pretrained_args(Path(path))
    if not trust_remote_code:
        refuse_remote_code(Path(path))
    try:
        return auto_cls.from_pretrained(source, **kwargs, **extra, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{CONFIG_KEY}: cannot load {what} from {path}: {e}") from e


def refuse_remote_code(path: Path) -> None:
    """ConfigError when a model directory asks transformers to import its own Python code (auto_map)."""
    for name in _CODE_MAPS if path.is_dir() else ():
        try:
            data = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # absent, or broken: transformers names the problem when it reads the file
        if isinstance(data, dict) and data.get("auto_map"):
            raise ConfigError(
                f"{TRUST_KEY}: {path / name} asks to run Python code shipped with the model (auto_map: "
                f"{', '.join(map(str, data['auto_map']))}); spinlm runs it only when {TRUST_KEY}=true "
                "(spinlm evaluate: --trust-remote-code), which executes that code with your permissions: "
                "allow it only for a model you trust"
            )


def _from_pretrained_args(path: Path) -> tuple[str, dict]:
    """Map a user path to ``from_pretrained`` arguments, rejecting what cannot be a model early."""
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    if not path.is_dir():
        raise ConfigError(f"{CONFIG_KEY}: {path} is neither a model directory nor a .gguf file")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{CONFIG_KEY}: {path} is not a Hugging Face model directory (no config.json)")
    return str(path), {}


def _drop_gguf_quantizer(model: PreTrainedModel) -> None:
    """GGUF weights arrive de-quantised; forget the quantizer so save_pretrained writes a plain model."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)


def _ensure_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token and make the model config agree with it."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def export_hf(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path, state_dict: dict | None = None
) -> Path:
    """Save model (safetensors) + tokenizer to ``out_dir`` atomically, so a crash never leaves half a model.

    ``state_dict``: the weights to write instead of the model's own (a sharded model's full weights)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = unwrap(model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; an existing ``dst`` is moved aside first and deleted after the swap."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def context_length(model_or_config: nn.Module | PretrainedConfig) -> int:
    """The longest sequence the model's position embeddings support, read from its config."""
    config = model_or_config
    if isinstance(model_or_config, nn.Module):
        config = unwrap(model_or_config).config
    for key in _CONTEXT_LENGTH_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ConfigError(f"model config has none of {', '.join(_CONTEXT_LENGTH_KEYS)}; cannot tell its context length")
