"""SPIN with model.spin.generation_backend=vllm on a tiny model (head_dim 32, which vLLM's CPU attention
supports), fp32: the command line end to end, the rollouts file, resume, and two FSDP2 ranks.

Needs vLLM (`pip install -e '.[vllm]'`); skipped where it is not installed. Engines run one at a
time in a process, with a 64 MiB KV cache.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from conftest import sigterm_at_step  # noqa: E402
from spawn import run_ranks  # noqa: E402
from test_spin import make_cfg  # noqa: E402

from spinlm.model.tiny import build_tiny_model  # noqa: E402
from spinlm.model.vllm_engine import VLLMBackend  # noqa: E402
from spinlm.train import build_trainer, run  # noqa: E402

pytestmark = pytest.mark.vllm

VLLM = ("model.spin.generation_backend=vllm", "model.spin.vllm.kv_cache_gb=0.0625")
ONE_ITERATION = ("trainer.spin.max_iterations=1", "trainer.spin.max_epochs=1", "model.optim.sched.warmup_steps=0")
ROLLOUT_KEYS = {"index", "generated_ids", "truncated", "ref_logp_actual", "ref_logp_generated", "text"}


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("tiny_vllm_model")
    build_tiny_model(tokenizer, hidden_size=64, num_heads=2, max_position_embeddings=256, seed=0).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _rollouts(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "rollouts" / "iter_0.jsonl").read_text().splitlines()]


def test_train_on_vllm_from_the_command_line_exports_and_matches_the_decoders_rollouts(
        tmp_path, vllm_model_dir, chat_files):
    greedy = ("model.spin.sampling_params.use_greedy=true", *ONE_ITERATION)
    theirs = make_cfg(tmp_path / "vllm", vllm_model_dir, chat_files, *greedy, *VLLM)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "spinlm", "train", *_cli_args(theirs)], env=env, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    final = tmp_path / "vllm" / "final"
    assert (final / "config.json").is_file() and (final / "model.safetensors").is_file()
    rows = [json.loads(line) for line in (tmp_path / "vllm" / "metrics.jsonl").read_text().splitlines()]
    assert any("timing/weight_sync_s" in r for r in rows)

    ours = make_cfg(tmp_path / "spinlm", vllm_model_dir, chat_files, *greedy)
    run(ours)
    a, b = _rollouts(tmp_path / "vllm"), _rollouts(tmp_path / "spinlm")
    assert all(set(r) == ROLLOUT_KEYS for r in a) and [r["index"] for r in a] == [r["index"] for r in b]
    same = [x for x, y in zip(a, b) if x["generated_ids"] == y["generated_ids"]]
    assert len(same) >= 0.95 * len(b)
    by_index = {r["index"]: r for r in b}
    for r in same:  # the reference log-probs come from the training stack: the decoder's fused scoring's values
        for key in ("truncated", "ref_logp_actual", "ref_logp_generated"):
            assert r[key] == pytest.approx(by_index[r["index"]][key], abs=1e-4)


def _cli_args(cfg) -> list[str]:
    """The command line of `cfg` (the keys make_cfg and the test set)."""
    keys = ["pretrained_checkpoint.restore_from_path", "model.data.train_ds.file_path",
            "model.data.validation_ds.file_path", "exp_manager.explicit_log_dir"]
    from omegaconf import OmegaConf

    args = [f"{k}={OmegaConf.select(cfg, k)}" for k in keys]
    for key in ("trainer.precision", "trainer.spin.max_iterations", "trainer.spin.max_epochs",
                "trainer.spin.limit_train_batches", "trainer.spin.val_check_interval", "trainer.spin.save_interval",
                "model.global_batch_size", "model.micro_batch_size", "model.encoder_seq_length",
                "model.spin.length_params.max_length", "model.spin.rollout_micro_batch_size",
                "model.spin.log_prob_forward_micro_batch_size", "model.optim.lr", "model.optim.sched.warmup_steps",
                "model.optim.sched.constant_steps", "model.spin.sampling_params.use_greedy",
                "model.spin.generation_backend", "model.spin.vllm.kv_cache_gb"):
        value = OmegaConf.select(cfg, key)
        args.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    return args


def test_a_resumed_run_reuses_the_rollouts_without_starting_an_engine(tmp_path, vllm_model_dir, chat_files,
                                                                        monkeypatch):
    cfg = make_cfg(tmp_path / "run", vllm_model_dir, chat_files, *VLLM, "trainer.spin.max_iterations=1",
                   "trainer.spin.save_interval=1")
    trainer = build_trainer(cfg)
    sigterm_at_step(trainer, 1, monkeypatch)
    trainer.generator.close()
    assert trainer.step == 2
    stored = (tmp_path / "run" / "rollouts" / "iter_0.jsonl").read_bytes()

    calls = []
    for name in ("sync_weights", "generate"):
        monkeypatch.setattr(VLLMBackend, name, lambda *a, _n=name, **k: calls.append(_n))
    resumed = run(cfg)
    assert resumed.step == 4 and calls == [] and resumed.generator.llm is None
    assert (tmp_path / "run" / "rollouts" / "iter_0.jsonl").read_bytes() == stored
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def _two_rank_rollouts(rank, run_dir, model_dir, files):
    cfg = make_cfg(run_dir, model_dir, files, *VLLM, *ONE_ITERATION, "trainer.strategy=fsdp",
                   "model.micro_batch_size=1", "exp_manager.checkpoint_callback_params.save_nemo_on_train_end=false")
    run(cfg)
    return _rollouts(run_dir) if rank == 0 else None


def test_two_fsdp_ranks_sample_the_rollouts_of_one_process(tmp_path, vllm_model_dir, chat_files):
    """Each rank's engine samples its share of the prompts, each from its own seed (FSDP2: the reference's
    shards are gathered tensor by tensor into the engines)."""
    cfg = make_cfg(tmp_path / "one", vllm_model_dir, chat_files, *VLLM, *ONE_ITERATION, "model.micro_batch_size=1",
                   "exp_manager.checkpoint_callback_params.save_nemo_on_train_end=false")
    run(cfg)
    one = _rollouts(tmp_path / "one")
    two = run_ranks(_two_rank_rollouts, 2, tmp_path / "ranks", tmp_path / "two", vllm_model_dir, chat_files,
                    timeout=900)[0]
    assert [r["generated_ids"] for r in two] == [r["generated_ids"] for r in one]
    assert any(not r["truncated"] for r in one) and len({tuple(r["generated_ids"]) for r in one}) > 1
    for key in ("ref_logp_actual", "ref_logp_generated"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-6, abs=1e-5)
    assert torch.isfinite(torch.tensor([r["ref_logp_generated"] for r in two])).all()
