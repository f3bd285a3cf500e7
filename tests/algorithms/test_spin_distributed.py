"""SPIN on two gloo ranks (DDP and FSDP2) ends where one process does; a 2-rank run resumes anywhere.

Same config, global batch and seed: the generated ids are identical (sampled and greedy); the loss
trajectory, validation loss and final weights agree with one process within 1e-5 (absolute), the
reference log-prob sums (about -100) within 1e-6 relative: gradients summed over ranks round
differently, by float32 ulps.
"""

import importlib.util
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from spawn import run_ranks
from test_spin import make_cfg

from spinlm.algorithms.spin import SPINTrainer
from spinlm.model import parallel
from spinlm.train import build_trainer, run
from spinlm.utils.distributed import barrier, info

TOL = 1e-5


def _cfg(run_dir, model_dir, files, *overrides):
    return make_cfg(run_dir, model_dir, files, "model.micro_batch_size=1", "trainer.spin.save_interval=4",
                    *overrides)


def _outcome(trainer, run_dir):
    """What a run produced (weights gathered from every rank: call on all; rank 0's is complete)."""
    weights = parallel.full_state_dict(trainer.policy)
    reference = trainer.reference.full_state_dict()
    if not info().is_main:
        return {}
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    rollouts = {p.name: [json.loads(line) for line in p.read_text().splitlines()]
                for p in sorted((Path(run_dir) / "rollouts").glob("*.jsonl"))}
    return {
        "losses": [r["train/loss"] for r in rows if "train/loss" in r],
        "val": [r["val/loss"] for r in rows if "val/loss" in r],
        "lengths": [r["train/avg_generated_lengths"] for r in rows if "train/loss" in r],
        "weights": weights,
        "reference": reference,
        "rollouts": rollouts,
        "final": sorted(p.name for p in (Path(run_dir) / "final").glob("*")),
    }


def _assert_same_run(got, want):
    assert got["rollouts"].keys() == want["rollouts"].keys()
    for name, rows in want["rollouts"].items():
        assert [r["generated_ids"] for r in got["rollouts"][name]] == [r["generated_ids"] for r in rows]
        for key in ("ref_logp_actual", "ref_logp_generated"):
            assert [r[key] for r in got["rollouts"][name]] == pytest.approx(  # sums ~ -100: float32 ulps
                [r[key] for r in rows], rel=1e-6, abs=TOL)
    assert got["losses"] == pytest.approx(want["losses"], abs=TOL)
    assert len(got["losses"]) == 8
    assert got["val"] == pytest.approx(want["val"], abs=TOL)
    assert got["lengths"] == want["lengths"]
    for key in ("weights", "reference"):
        assert got[key].keys() == want[key].keys()
        for name in want[key]:
            assert torch.allclose(got[key][name], want[key][name], atol=TOL), (key, name)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from conftest import write_chat_jsonl

    base = tmp_path_factory.mktemp("data")
    return write_chat_jsonl(base / "train.jsonl", 32, seed=0), write_chat_jsonl(base / "val.jsonl", 16, seed=1)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, tiny_model_dir, files):
    """One-process runs: sampled, greedy, and sampled with LoRA (when peft is installed)."""
    base = tmp_path_factory.mktemp("single")
    out = {}
    for mode, overrides in _modes().items():
        trainer = build_trainer(_cfg(base / mode, tiny_model_dir, files, *overrides))
        trainer.fit()
        trainer.logger.close()
        out[mode] = _outcome(trainer, base / mode)
    return out


LORA = ("model.peft.peft_scheme=lora", "model.peft.lora_tuning.adapter_dim=3",  # 3 rows of A: uneven shards
        "model.peft.lora_tuning.target_modules=[attention_qkv,mlp_fc2]", "model.optim.lr=1e-2")


def _modes() -> dict[str, tuple[str, ...]]:
    modes = {"sampled": (), "greedy": ("model.spin.sampling_params.use_greedy=true",)}
    if importlib.util.find_spec("peft") is not None:
        modes["lora"] = LORA
    return modes


def _crash_then_resume(run_dir, model_dir, files, first, second):
    """A 2-rank run (strategy `first`) dies at step 6 (checkpoint at 4); its run dir is copied for a
    1-process resume, then resumed here on 2 ranks with strategy `second`."""
    real_step = SPINTrainer.train_single_step

    def crash(self, batch):
        if self.step == 6:
            raise RuntimeError("simulated crash")
        return real_step(self, batch)

    SPINTrainer.train_single_step = crash
    greedy = "model.spin.sampling_params.use_greedy=true"
    try:
        build_trainer(_cfg(run_dir, model_dir, files, greedy, f"trainer.strategy={first}")).fit()
    except RuntimeError as e:
        assert "simulated crash" in str(e)
    finally:
        SPINTrainer.train_single_step = real_step
    barrier()
    if info().is_main:
        shutil.copytree(run_dir, run_dir + "_single")
    barrier()
    resumed = build_trainer(_cfg(run_dir, model_dir, files, greedy, f"trainer.strategy={second}"))
    start = resumed.step
    resumed.fit()
    resumed.logger.close()
    return {**_outcome(resumed, run_dir), "start": start}


def _all_runs(rank, base, model_dir, files):
    """Every 2-rank run of this module in one pair of processes (starting them costs ~10 s), counting the
    reads of the weights files: only rank 0 reads them."""
    reads = _count_weight_reads()
    out = {}
    for strategy in ("ddp", "fsdp"):
        run_dir = f"{base}/{strategy}"
        trainer = run(_cfg(run_dir, model_dir, files, f"trainer.strategy={strategy}"))
        out[strategy] = _outcome(trainer, run_dir)
        if "lora" in _modes():
            run_dir = f"{base}/lora_{strategy}"
            trainer = run(_cfg(run_dir, model_dir, files, f"trainer.strategy={strategy}", *LORA))
            out[f"lora_{strategy}"] = _outcome(trainer, run_dir)
    out["resume"] = _crash_then_resume(f"{base}/resume", model_dir, files, "ddp", "fsdp")
    out["reads"] = dict(reads)
    return out


def _count_weight_reads() -> Counter:
    """Calls of the functions that read a weights file (the pretrained model; a checkpoint's) or a checkpoint's
    optimizer state, in this process."""
    from spinlm.model import build
    from spinlm.utils import checkpoint
    from spinlm.utils.checkpoint import Checkpointer

    reads = Counter()
    real_load, real_weights, real_state = build.load_model, Checkpointer.weights, checkpoint.load_state

    def load_model(*args, **kwargs):
        reads["pretrained"] += 1
        return real_load(*args, **kwargs)

    def weights(path, name):
        reads["checkpoint"] += 1
        return real_weights(path, name)

    def load_state(path):
        if path.name.startswith("optimizer."):
            reads["optimizer"] += 1
        return real_state(path)

    build.load_model, Checkpointer.weights, checkpoint.load_state = load_model, staticmethod(weights), load_state
    return reads


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tiny_model_dir, files):
    base = tmp_path_factory.mktemp("ranks")
    r0, r1 = run_ranks(_all_runs, 2, base / "results", str(base), str(tiny_model_dir), files)
    assert r0["resume"]["start"] == r1["resume"]["start"] == 4
    builds = 4 + 2 * ("lora" in _modes())  # ddp, fsdp (and with LoRA), the crashed run, its resume
    # the resume reads the policy's weights (the policy is the reference) and the optimizer state, on rank 0 only
    assert r0["reads"] == {"pretrained": builds, "checkpoint": 1, "optimizer": 1} and r1["reads"] == {}
    return r0, base


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(two_ranks, single_process, strategy):
    r0, base = two_ranks
    _assert_same_run(r0[strategy], single_process["sampled"])
    assert "model.safetensors" in r0[strategy]["final"]  # the unsharded HF export, written once


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_with_lora_match_one_process(two_ranks, single_process, strategy):
    pytest.importorskip("peft")
    r0, base = two_ranks
    _assert_same_run(r0[f"lora_{strategy}"], single_process["lora"])
    assert any("lora_A" in name for name in r0[f"lora_{strategy}"]["weights"])


def test_interrupted_two_rank_run_resumes_on_two_ranks_of_the_other_strategy_and_on_one_process(
    two_ranks, single_process, tiny_model_dir, files
):
    r0, base = two_ranks
    _assert_same_run(r0["resume"], single_process["greedy"])

    run_dir = base / "resume_single"  # the crashed 2-rank run's directory, resumed by one process
    single = build_trainer(_cfg(run_dir, tiny_model_dir, files, "model.spin.sampling_params.use_greedy=true"))
    assert single.step == 4
    single.fit()
    single.logger.close()
    _assert_same_run(_outcome(single, run_dir), single_process["greedy"])
