"""A bf16 / bf16-mixed SPIN run on the tiny model: first-step loss, weights, optimizer, activation checkpointing."""

import importlib.util
import json
import math

import pytest
import torch
from conftest import crash_at_step
from test_spin import LORA, cfg_factory, params_vector, reference_vector  # noqa: F401 (a fixture)

from transformers import AutoConfig

from spinlm.model.bf16_adamw import BF16AdamW
from spinlm.train import build_trainer



def _first_step(cfg_factory, precision, *overrides):
    trainer = build_trainer(cfg_factory(f"trainer.precision={precision}", "trainer.spin.max_steps=1", "model.optim.sched.warmup_steps=0", *overrides,
                                        run_name=precision))
    batch = next(trainer.augment_dataloader(0, 0))
    return trainer, batch, trainer.train_single_step(batch)


def test_bf16_first_step_loss_is_ln2_and_weights_stay_bf16(cfg_factory):
    """policy == reference at step 1, so the loss is ln 2 up to bf16's rounding of the log-probs (the reference's
    come from the decoding pass, the policy's from packed rows). Stated tolerance on this model: 1e-3 (measured
    ~3e-5; the real model: tests/algorithms/test_precision_smollm2_slow.py)."""
    trainer, _, metrics = _first_step(cfg_factory, "bf16")
    assert abs(metrics["loss"] - math.log(2)) <= 1e-3
    assert metrics["loss"] != math.log(2)  # computed in bf16 indeed (fp32 gives ln 2 to 1e-7)
    assert {p.dtype for p in trainer.policy.parameters()} == {torch.bfloat16}
    with trainer.reference.active() as reference:
        assert {p.dtype for p in reference.parameters()} == {torch.bfloat16}
    assert isinstance(trainer.optimizer, BF16AdamW)
    assert all(p.grad is None for p in trainer.policy.parameters())  # freed after the step
    states = list(trainer.optimizer.state.values())
    assert states and all(s["exp_avg"].dtype == torch.float32 and s["master_low"].view(torch.int16).any()
                          for s in states)
    assert metrics["grad_norm"] > 0


def test_activation_checkpointing_run_equals_a_run_without(cfg_factory):
    """fp32, 4 steps over 2 iterations (a reference refresh, optimizer states): the same losses and weights."""
    short = ("trainer.spin.max_epochs=1", "model.global_batch_size=2", "model.micro_batch_size=1")
    runs = {}
    for ckpt in ("null", "full"):
        trainer = build_trainer(cfg_factory(f"model.activations_checkpoint_granularity={ckpt}", *short, run_name=ckpt))
        trainer.fit()
        rows = [json.loads(r) for r in (trainer.logger.run_dir / "metrics.jsonl").read_text().splitlines()]
        runs[ckpt] = ([r["train/loss"] for r in rows if "train/loss" in r], params_vector(trainer.policy))
    assert len(runs["full"][0]) == 4
    assert runs["full"][0] == pytest.approx(runs["null"][0], abs=1e-6)
    torch.testing.assert_close(runs["full"][1], runs["null"][1], rtol=0, atol=1e-6)


def test_bf16_resume_after_crash_is_bitwise(cfg_factory, monkeypatch):
    """The optimizer's fp32 moments and master low bits survive a checkpoint; bf16 weights, the bf16 reference."""
    overrides = ("trainer.precision=bf16", "model.activations_checkpoint_granularity=full", "trainer.spin.max_epochs=1",
                 "model.global_batch_size=2", "model.micro_batch_size=1")  # 4 steps, a refresh after step 2
    full = build_trainer(cfg_factory(*overrides, run_name="full"))
    full.fit()
    crash_at_step(build_trainer(cfg_factory(*overrides, run_name="crashy")), 3, monkeypatch)
    resumed = build_trainer(cfg_factory(*overrides, run_name="crashy"))
    assert resumed.step == 2
    resumed.fit()
    assert resumed.step == full.step == 4
    assert torch.equal(params_vector(resumed.policy), params_vector(full.policy))
    assert torch.equal(reference_vector(resumed), reference_vector(full))
    lows = [torch.cat([s["master_low"].view(torch.int16).flatten() for s in t.optimizer.state.values()])
            for t in (resumed, full)]
    assert torch.equal(*lows)
    assert AutoConfig.from_pretrained(full.logger.run_dir / "final").dtype == torch.bfloat16


# ----- FSDP2 ---------------------------------------------------------------------------------------------
FSDP_RUNS = {  # name: overrides (precision, recomputation, LoRA), loss tolerance against one process
    "bf16-mixed": (("trainer.precision=bf16-mixed", "model.activations_checkpoint_granularity=full"), 1e-5),  # fp32 grads
    "bf16": (("trainer.precision=bf16", "model.activations_checkpoint_granularity=selective"), 2e-3),  # bf16 grads
    "bf16+lora": (("trainer.precision=bf16", *LORA), 2e-3),  # the bf16 base is the reference; merged at step 2
}
if importlib.util.find_spec("peft") is None:
    del FSDP_RUNS["bf16+lora"]
SHORT = ("trainer.spin.max_epochs=1", "model.global_batch_size=2", "model.micro_batch_size=1",
         "model.spin.sampling_params.use_greedy=true")


def _tied_model_dir(path):
    from spinlm.model.tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, max_position_embeddings=256, seed=4)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _fsdp_runs(rank, base, model_dir, files):
    from test_spin import make_cfg

    out = {}
    for name, (overrides, _) in FSDP_RUNS.items():
        cfg = make_cfg(f"{base}/{name}", model_dir, files, *overrides, *SHORT, "trainer.strategy=fsdp")
        trainer = build_trainer(cfg)
        trainer.fit()
        trainer.logger.close()
        rows = [json.loads(r) for r in (trainer.logger.run_dir / "metrics.jsonl").read_text().splitlines()]
        out[name] = [r["train/loss"] for r in rows if "train/loss" in r]
    return out


def test_fsdp2_two_ranks_with_bf16_reference_and_recomputation_match_one_process(tmp_path, chat_files):
    """A tied model (the mixed reference unties its LM head) sharded over 2 gloo ranks, refreshed at step 2;
    and LoRA on a bf16 base (merged at step 2) over the same 2 ranks."""
    from spawn import run_ranks
    from test_spin import make_cfg

    model_dir = _tied_model_dir(tmp_path / "tied")
    ranks = run_ranks(_fsdp_runs, 2, tmp_path / "ranks", str(tmp_path / "fsdp"), str(model_dir), chat_files)
    for name, (overrides, tol) in FSDP_RUNS.items():
        single = build_trainer(make_cfg(tmp_path / name, model_dir, chat_files, *overrides, *SHORT))
        single.fit()
        rows = [json.loads(r) for r in (single.logger.run_dir / "metrics.jsonl").read_text().splitlines()]
        losses = [r["train/loss"] for r in rows if "train/loss" in r]
        assert len(losses) == 4
        assert ranks[0][name] == pytest.approx(losses, abs=tol), name
        assert max(losses) - min(losses) > 10 * tol, (name, losses)  # it trained: the losses moved


def test_lora_on_a_bf16_base_merges_and_resets_the_exact_master(cfg_factory):
    """trainer.precision=bf16 + LoRA: a bf16 base (the reference, no copy), bf16 adapters under BF16AdamW whose
    master remainder is zeroed with the moments at each merge; each iteration opens at ln 2 (bf16 rounding)."""
    pytest.importorskip("peft")
    from test_spin import read_metrics

    trainer = build_trainer(cfg_factory(*LORA, "trainer.precision=bf16", "trainer.spin.max_epochs=1",
                                        "model.global_batch_size=2", "model.micro_batch_size=1", run_name="lora"))
    assert {p.dtype for p in trainer.policy.parameters()} == {torch.bfloat16}
    assert isinstance(trainer.optimizer, BF16AdamW) and not hasattr(trainer.reference, "module")
    trainer.fit()  # 4 steps: merges after steps 2 and 4
    losses = [r["train/loss"] for r in read_metrics(trainer.logger.run_dir) if "train/loss" in r]
    assert len(losses) == 4
    assert [losses[0], losses[2]] == pytest.approx([math.log(2)] * 2, abs=1e-2)
    assert abs(losses[1] - math.log(2)) > 1e-3  # it trained in between
    states = [s for s in trainer.optimizer.state.values() if s]
    assert states and all(not s["master_low"].view(torch.int16).any() and not s["exp_avg"].any() for s in states)
