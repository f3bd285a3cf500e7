"""spinlm.spin: the README's example runs as written; overrides map onto gpt_spin.yaml keys with the
same checks; the run directory, checkpoints and resume are the CLI's."""

import json
import re
from pathlib import Path

import pytest
import torch

import spinlm
from spinlm.errors import ConfigError, DataError
from spinlm.model.tiny import build_tiny_model, build_tiny_tokenizer

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    section = README.read_text(encoding="utf-8").split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def train_losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


def weights(model):
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def test_readme_example_runs_and_resumes(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.chdir(tmp_path)
    example = readme_example()
    namespace: dict = {}
    exec(compile(example, "README.md (Python API)", "exec"), namespace)
    trained, model = namespace["trained"], namespace["model"]
    assert trained is model
    start = namespace["AutoModelForCausalLM"].from_pretrained(namespace["model_dir"])
    assert not torch.equal(weights(trained), weights(start))
    run_dir = tmp_path / "runs" / "notebook"
    assert (run_dir / "final" / "config.json").is_file() and list(run_dir.glob("checkpoints/step_*"))
    assert (run_dir / "config.yaml").read_text().count("<in-memory Dataset, 32 rows, model.data.train_ds>") == 1
    losses = train_losses(run_dir)
    assert [step for step, _ in losses] == [1, 2, 3, 4]

    again: dict = {}  # the same call again resumes the finished run: no step is trained twice
    exec(compile(example, "README.md (Python API)", "exec"), again)
    assert train_losses(run_dir) == losses
    assert torch.equal(weights(again["trained"]), weights(trained))


def tiny_pair():
    tokenizer = build_tiny_tokenizer()
    return build_tiny_model(tokenizer, seed=0), tokenizer


CHATS = [[{"role": "user", "content": f"{i} + 1?"}, {"role": "assistant", "content": f"{i + 1}."}] for i in range(8)]


def test_overrides_are_checked_like_the_command_line(tmp_path):
    model, tokenizer = tiny_pair()
    with pytest.raises(ConfigError, match="unknown key 'model.optim.lrr'"):
        spinlm.spin(model, tokenizer, CHATS, run_dir=tmp_path, model__optim__lrr=1.0)
    with pytest.raises(ConfigError, match="'model.optim.lr' must be a number"):
        spinlm.spin(model, tokenizer, CHATS, run_dir=tmp_path, config={"model": {"optim": {"lr": "fast"}}})
    with pytest.raises(ConfigError, match="key 'model.optim.lr' is given twice"):
        spinlm.spin(model, tokenizer, CHATS, run_dir=tmp_path, config={"model.optim.lr": 1e-5}, model__optim__lr=2e-5)
    with pytest.raises(ConfigError, match="model.global_batch_size"):
        spinlm.spin(model, tokenizer, CHATS, run_dir=tmp_path,
                    **{"model.global_batch_size": 3, "model.micro_batch_size": 2})
    with pytest.raises(DataError, match=r"model\.data\.train_ds \(in-memory list\): row 2: "):
        spinlm.spin(model, tokenizer, CHATS[:2] + [[{"role": "user", "content": "no answer"}]], run_dir=tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()
