"""prepare(): every check before the weights load, and nothing written."""

import logging

import pytest

from spinlm.config import load_config
from spinlm.preflight import prepare


def cfg_for(tmp_path, model_dir, files, *overrides):
    train, val = files
    return load_config([
        f"pretrained_checkpoint.restore_from_path={model_dir}",
        f"model.data.train_ds.file_path={train}", f"model.data.validation_ds.file_path={val}",
        f"exp_manager.explicit_log_dir={tmp_path / 'run'}", "model.global_batch_size=4",
        "model.spin.length_params.max_length=16", *overrides,
    ])


def test_prepare_reads_data_without_loading_weights(tmp_path, tiny_model_dir, chat_files, monkeypatch):
    import transformers

    def no_weights(*a, **k):
        raise AssertionError("weights loaded during preflight")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    cfg = cfg_for(tmp_path, tiny_model_dir, chat_files)
    prep = prepare(cfg)
    assert len(prep.train) == 16 and len(prep.val) == 8
    assert cfg.model.encoder_seq_length == 256  # read from the model's config alone
    assert cfg.model.data.train_ds.max_seq_length == 256  # resolved in place
    assert not (tmp_path / "run").exists()


def test_repeated_records_are_reported(tmp_path, tiny_model_dir, chat_files, caplog):
    train, val = chat_files
    lines = train.read_text().splitlines()
    train.write_text("\n".join(lines + lines[:2]) + "\n")
    with caplog.at_level(logging.WARNING):
        prepare(cfg_for(tmp_path, tiny_model_dir, chat_files))
    assert "2 record(s) repeat an earlier one (line 17 repeats line 1)" in caplog.text


def test_resume_required_but_no_checkpoint(tmp_path, tiny_model_dir, chat_files):
    cfg = cfg_for(tmp_path, tiny_model_dir, chat_files, "exp_manager.resume_ignore_no_checkpoint=false")
    with pytest.raises(Exception, match="no checkpoint in"):
        prepare(cfg)
