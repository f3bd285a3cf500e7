"""SPINTrainer behaviour on a tiny model: positions, reference handling, generation reuse, resume."""

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import crash_at_step

from spinlm.algorithms.spin import SPINTrainer
from spinlm.config import load_config
from spinlm.model.generation import DecoderBackend, generate
from spinlm.model.reference import FrozenReference, PolicyAsReference
from spinlm.schedule import count_steps
from spinlm.train import build_trainer, run


def make_cfg(run_dir, model_dir, files, *overrides):
    train, val = files
    base = [
        f"pretrained_checkpoint.restore_from_path={model_dir}",
        f"model.data.train_ds.file_path={train}",
        f"model.data.validation_ds.file_path={val}",
        f"exp_manager.explicit_log_dir={run_dir}",
        "trainer.precision=32",
        "trainer.spin.max_iterations=2",
        "trainer.spin.max_epochs=2",
        "trainer.spin.limit_train_batches=2",   # 2 steps an epoch -> 8 steps in all
        "trainer.spin.val_check_interval=2",
        "trainer.spin.save_interval=2",
        "model.global_batch_size=4",
        "model.micro_batch_size=2",
        "model.encoder_seq_length=128",
        "model.spin.length_params.max_length=24",
        "model.spin.rollout_micro_batch_size=8",
        "model.spin.log_prob_forward_micro_batch_size=4",
        "model.optim.lr=1e-3",
        "model.optim.sched.warmup_steps=2",
        "model.optim.sched.constant_steps=0",
    ]
    # a test's own override replaces the default above (load_config refuses a key given twice)
    merged = {o.split("=", 1)[0]: o for o in [*base, *overrides]}
    return load_config(list(merged.values()))


@pytest.fixture
def cfg_factory(tmp_path, tiny_model_dir, chat_files):
    def factory(*overrides, run_name="run"):
        return make_cfg(tmp_path / run_name, tiny_model_dir, chat_files, *overrides)
    return factory


def params_vector(module):
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


def reference_vector(trainer):
    """The reference's weights, whatever its kind (a frozen copy, or the policy itself)."""
    with trainer.reference.active() as reference:
        return params_vector(reference)


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ----- positions ------------------------------------------------------------------------
def test_count_steps_and_derived_positions(cfg_factory):
    cfg = cfg_factory("trainer.spin.limit_train_batches=1.0")
    assert count_steps(16, cfg.trainer.spin, 4) == (4, 8, 16)
    cfg.trainer.spin.limit_train_batches = 0.5
    assert count_steps(16, cfg.trainer.spin, 4) == (2, 4, 8)
    cfg.trainer.spin.max_steps = 5
    assert count_steps(16, cfg.trainer.spin, 4) == (2, 4, 5)
    cfg.trainer.spin.limit_train_batches = 3
    assert count_steps(17, cfg.trainer.spin, 4)[0] == 3

    trainer = build_trainer(cfg_factory())
    assert (trainer.steps_per_epoch, trainer.schedule.iteration_start(1), trainer.max_steps) == (2, 4, 8)
    expected = [(0, 0), (0, 0), (1, 0), (1, 0), (0, 1), (0, 1), (1, 1), (1, 1)]
    for step, (epoch, iteration) in enumerate(expected):
        trainer.step = step
        assert (trainer.epoch, trainer.iteration) == (epoch, iteration)


def test_kl_penalty_list_sets_beta_per_iteration(cfg_factory):
    cfg = cfg_factory("model.spin.ref_policy_kl_penalty=[0.3,0.05]")
    run(cfg)
    rows = [r for r in read_metrics(Path(cfg.exp_manager.explicit_log_dir)) if "train/beta" in r]
    assert [r["train/beta"] for r in rows] == [0.3] * 4 + [0.05] * 4


# ----- the reference policy ---------------------------------------------------------------
def test_generation_and_reference_logprobs_use_reference_weights(cfg_factory):
    """A frozen copy (kept when generating at every epoch) answers, not the policy that drifted from it."""
    trainer = build_trainer(cfg_factory("model.spin.sampling_params.use_greedy=true",
                                        "model.spin.regenerate_each_epoch=true"))
    assert isinstance(trainer.reference, FrozenReference)
    ref_before = params_vector(trainer.reference.module)
    with torch.no_grad():  # the policy drifts away from the reference
        for p in trainer.policy.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    rollouts = trainer._rollouts_for(0, 0)
    indices = sorted(rollouts)
    prompts = [trainer.train_dataset[i]["prompt_ids"] for i in indices]
    with trainer.reference.active() as reference:
        from_ref = generate(reference, trainer.tokenizer, prompts, trainer.sampling)
    from_policy = generate(trainer.policy, trainer.tokenizer, prompts, trainer.sampling)
    assert [rollouts[i].generated_ids for i in indices] == from_ref.ids
    assert from_ref.ids != from_policy.ids
    assert torch.equal(params_vector(trainer.reference.module), ref_before)

    batch = trainer._pair_batch([(0, i) for i in indices[:2]], {(0, i): r for i, r in rollouts.items()})
    expected = trainer.reference.logprobs(batch["actual"], batch["actual_mask"])
    assert torch.allclose(batch["ref_policy_log_probs_actual"], expected, atol=1e-4)


def test_reference_changes_at_iteration_ends_only(cfg_factory, monkeypatch):
    trainer = build_trainer(cfg_factory("model.spin.regenerate_each_epoch=true"))  # a frozen copy
    seen = []
    original = trainer._log_step

    def record(metrics, batch):
        seen.append((trainer.step, params_vector(trainer.reference.module), params_vector(trainer.policy)))
        original(metrics, batch)

    monkeypatch.setattr(trainer, "_log_step", record)
    saved = []
    original_save = trainer.save
    monkeypatch.setattr(trainer, "save", lambda: (saved.append(params_vector(trainer.reference.module)), original_save()))
    initial_ref = params_vector(trainer.reference.module)
    trainer.fit()

    previous = initial_ref
    for step, ref, policy in seen:
        if trainer.schedule.is_iteration_end(step):
            assert torch.equal(ref, policy), f"reference not refreshed at iteration end (step {step})"
        else:
            assert torch.equal(ref, previous), f"reference changed inside an iteration (step {step})"
        previous = ref
    # the checkpoint written at step 4 (an iteration boundary) holds the refreshed reference
    assert torch.equal(saved[1], seen[3][2])


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_policy_as_reference_trains_as_a_frozen_copy_does(cfg_factory, monkeypatch, precision):
    """Full fine-tuning keeps no reference copy: the same rollouts, reference log-probs, losses and weights,
    bitwise, as with one (2 iterations: a refresh between them); checkpoints hold no reference file."""
    from spinlm.model import build

    runs = {}
    for kind in ("policy", "frozen"):
        if kind == "frozen":
            monkeypatch.setattr(build, "reference_kind", lambda *args: "frozen")
        trainer = build_trainer(cfg_factory(f"trainer.precision={precision}", run_name=kind))
        assert isinstance(trainer.reference, PolicyAsReference if kind == "policy" else FrozenReference)
        trainer.fit()
        run_dir = trainer.logger.run_dir
        rollouts = {p.name: [{k: v for k, v in json.loads(line).items() if k != "text"} for line in p.open()]
                    for p in sorted((run_dir / "rollouts").glob("*.jsonl"))}
        losses = [r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r]
        files = {p.name for p in (run_dir / "checkpoints").glob("step_*/*.safetensors")}
        runs[kind] = rollouts, losses, params_vector(trainer.policy), files
    (rollouts, losses, weights, files), frozen = runs["policy"], runs["frozen"]
    assert len(rollouts) == 2 and rollouts == frozen[0]
    assert len(losses) == 8 and losses == frozen[1]
    assert torch.equal(weights, frozen[2])
    assert "reference.safetensors" in frozen[3] and "reference.safetensors" not in files


@pytest.mark.parametrize("crash_after", [3, 5])
def test_a_run_without_a_reference_copy_resumes_with_one(cfg_factory, monkeypatch, crash_after):
    """A checkpoint without a reference file (the policy was the reference) resumed where a frozen copy is kept
    (FSDP2 with mixed precision, or generating every epoch): the copy is filled from the checkpoint's policy,
    inside an iteration (step 2) as at its start (step 4); the run ends bitwise where an uninterrupted one does,
    and inside an iteration that copy is refused until the next refresh."""
    from spinlm.errors import TrainingError
    from spinlm.model import build

    full = build_trainer(cfg_factory(run_name="full"))
    full.fit()
    cfg = cfg_factory(run_name="crashy")
    crash_at_step(build_trainer(cfg), crash_after, monkeypatch)
    monkeypatch.setattr(build, "reference_kind", lambda *args: "frozen")
    resumed = build_trainer(cfg)
    assert isinstance(resumed.reference, FrozenReference) and resumed.step == crash_after - crash_after % 2
    if resumed.step == 2:
        with pytest.raises(TrainingError, match="holds only the policy"):
            resumed._reference_logprobs([0], [[5, 6]])
    resumed.fit()
    assert torch.equal(params_vector(resumed.policy), params_vector(full.policy))
    assert torch.equal(reference_vector(resumed), reference_vector(full))
    losses = [r["train/loss"] for r in read_metrics(resumed.logger.run_dir) if "train/loss" in r]
    assert losses == [r["train/loss"] for r in read_metrics(full.logger.run_dir) if "train/loss" in r]


def test_generates_once_per_iteration_and_reuses_on_disk(cfg_factory, monkeypatch):
    calls = []
    real = DecoderBackend.generate
    monkeypatch.setattr(DecoderBackend, "generate", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    cfg = cfg_factory()
    run(cfg)
    assert len(calls) == 2
    rollout_dir = Path(cfg.exp_manager.explicit_log_dir) / "rollouts"
    assert sorted(p.name for p in rollout_dir.iterdir()) == ["iter_0.jsonl", "iter_1.jsonl"]

    calls.clear()
    run(cfg_factory("model.spin.regenerate_each_epoch=true", run_name="regen"))
    assert len(calls) == 4


def test_first_step_loss_is_log2_and_micro_batch_invariant(cfg_factory):
    losses = {}
    for mbs in (1, 4):
        cfg = cfg_factory(f"model.micro_batch_size={mbs}", "trainer.spin.max_steps=1", "model.optim.sched.warmup_steps=0",
                          run_name=f"mbs{mbs}")
        trainer = build_trainer(cfg)
        batch = next(trainer.augment_dataloader(0, 0))
        metrics = trainer.train_single_step(batch)
        losses[mbs] = (metrics["loss"], params_vector(trainer.policy))
    assert losses[1][0] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at the start
    assert losses[4][0] == pytest.approx(losses[1][0], abs=1e-6)
    assert torch.allclose(losses[1][1], losses[4][1], atol=1e-6)


def test_validation_uses_the_same_batches(cfg_factory):
    trainer = build_trainer(cfg_factory("trainer.spin.limit_val_batches=2"))
    assert trainer.val_batches == [[0, 1, 2, 3], [4, 5, 6, 7]]
    first = trainer.run_validation()["val/loss"]
    assert trainer.run_validation()["val/loss"] == first
    assert first > 0


# ----- checkpoints, resume, time limit, export ----------------------------------------------
@pytest.mark.parametrize("crash_after", [3, 5, 7])
def test_resume_after_crash_matches_uninterrupted_run(cfg_factory, monkeypatch, crash_after):
    reference_run = build_trainer(cfg_factory(run_name="full"))
    reference_run.fit()
    full_losses = [r["train/loss"] for r in read_metrics(reference_run.logger.run_dir) if "train/loss" in r]

    cfg = cfg_factory(run_name="crashy")
    crash_at_step(build_trainer(cfg), crash_after, monkeypatch)

    resumed = build_trainer(cfg)
    assert resumed.step == crash_after - crash_after % 2  # the last checkpoint (save_interval=2)
    resumed.fit()
    assert torch.equal(params_vector(resumed.policy), params_vector(reference_run.policy))
    assert torch.equal(reference_vector(resumed), reference_vector(reference_run))
    losses = [r["train/loss"] for r in read_metrics(resumed.logger.run_dir) if "train/loss" in r]
    assert losses == full_losses


def test_resume_with_dropout_restores_rng(tmp_path, chat_files, monkeypatch):
    """With dropout the weights depend on the RNG stream: a resume must continue it exactly,
    whether or not the iteration's generations were already on disk (crash at step 5: they were)."""
    from spinlm.model.tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, max_position_embeddings=256)
    model.config.attention_dropout = 0.2
    model.save_pretrained(tmp_path / "dropout_model")
    tokenizer.save_pretrained(tmp_path / "dropout_model")
    full = build_trainer(make_cfg(tmp_path / "full", tmp_path / "dropout_model", chat_files))
    full.fit()

    cfg = make_cfg(tmp_path / "crashy", tmp_path / "dropout_model", chat_files)
    crash_at_step(build_trainer(cfg), 5, monkeypatch)
    resumed = build_trainer(cfg)
    resumed.fit()
    assert torch.equal(params_vector(resumed.policy), params_vector(full.policy))


def test_resume_continues_every_rng_stream(cfg_factory, monkeypatch):
    """torch, numpy and Python `random` draws after a resume equal an uninterrupted run's, bitwise
    (the checkpoint saves and restores each stream; build_trainer's seeding alone would not match)."""
    real_step = SPINTrainer.train_single_step
    draws, crash_at = {}, []

    def drawing(self, batch):
        if self.step in crash_at:
            raise RuntimeError("simulated crash")
        draws[self.step] = (torch.rand(2).tolist(), np.random.rand(2).tolist(), np.random.normal(),
                            random.random(), random.gauss(0, 1))
        return real_step(self, batch)

    monkeypatch.setattr(SPINTrainer, "train_single_step", drawing)
    kernel = "model.cpu_linear_kernel=default"  # "auto" measures with torch.randn once per process
    build_trainer(cfg_factory(kernel, run_name="full")).fit()
    full = dict(draws)
    cfg = cfg_factory(kernel, run_name="crashy")
    crash_at.append(5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_trainer(cfg).fit()
    crash_at.clear()
    draws.clear()
    resumed = build_trainer(cfg)
    assert resumed.step == 4
    resumed.fit()
    assert draws == {step: full[step] for step in range(4, 8)}


def test_max_time_validates_saves_and_stops(cfg_factory):
    cfg = cfg_factory("trainer.max_time=00:00:00:00")
    trainer = build_trainer(cfg)
    trainer.fit()
    assert trainer.step == 1
    run_dir = trainer.logger.run_dir
    assert (run_dir / "checkpoints" / "step_000001").is_dir()
    assert any("val/loss" in r for r in read_metrics(run_dir))
    assert not (run_dir / "final").exists()  # not the end of training: no export yet

    cfg.trainer.max_time = None
    cfg.exp_manager.max_time_per_run = None
    resumed = build_trainer(cfg)
    assert resumed.step == 1
    resumed.fit()
    assert resumed.step == resumed.max_steps
    assert (run_dir / "final" / "model.safetensors").is_file()


def test_final_export_reloads_as_hf_model(cfg_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer = run(cfg_factory("trainer.spin.max_iterations=1", "trainer.spin.max_epochs=1",
                              "model.optim.sched.warmup_steps=0"))
    final = trainer.logger.run_dir / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert torch.equal(params_vector(model), params_vector(trainer.policy))
    assert tokenizer.chat_template is not None


def test_metrics_use_reference_names_and_phase_timings(cfg_factory):
    trainer = run(cfg_factory())
    rows = read_metrics(trainer.logger.run_dir)
    keys = set().union(*rows)
    for name in ("train/loss", "train/acc", "train/rewards_actual_mean", "train/rewards_generated_mean",
                 "train/rewards_all_mean", "train/rewards_all_std", "train/avg_generated_lengths",
                 "train/grad_norm", "train/lr", "train/consumed_samples", "train/step_time", "train/epoch",
                 "train/iteration", "val/loss", "timing/generation_s", "timing/ref_logprobs_s", "timing/train_step_s"):
        assert name in keys, name
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps == list(range(1, 9))
    assert [r["train/iteration"] for r in rows if "train/loss" in r] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert (trainer.logger.run_dir / "samples.jsonl").read_text().count('"train/generations"') > 0


def test_data_sample_subsamples_max_steps_times_global_batch(cfg_factory):
    trainer = build_trainer(cfg_factory("model.data.sample=true", "trainer.spin.max_steps=3"))
    assert len(trainer.train_dataset) == 3 * 4
    assert trainer.max_steps == 3
    with pytest.raises(Exception, match="max_steps > 0"):
        build_trainer(cfg_factory("model.data.sample=true", run_name="nosteps"))


# ----- LoRA: the reference is the policy with its adapters off ----------------------------------
LORA = ("model.peft.peft_scheme=lora", "model.peft.lora_tuning.adapter_dim=4", "model.peft.lora_tuning.alpha=8",
        "model.peft.lora_tuning.target_modules=all", "model.optim.lr=1e-2")


def test_lora_run_merges_at_iteration_ends_and_exports_a_plain_model(cfg_factory):
    pytest.importorskip("peft")
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from spinlm.model.lora import hf_state_dict

    trainer = run(cfg_factory(*LORA))
    rows = [r for r in read_metrics(trainer.logger.run_dir) if "train/loss" in r]
    # steps 1 and 5 open an iteration: the policy equals its reference then (after a merge: up to its rounding)
    assert [r["train/loss"] for r in rows if r["step"] in (1, 5)] == pytest.approx([math.log(2)] * 2, abs=1e-5)
    assert abs(rows[3]["train/loss"] - math.log(2)) > 1e-3  # and it trained in between

    ckpt = trainer.logger.run_dir / "checkpoints" / "step_000008"
    assert not (ckpt / "reference.safetensors").exists()  # the reference is the policy's base weights
    assert any("lora_A" in k for k in load_file(str(ckpt / "policy.safetensors")))
    final = AutoModelForCausalLM.from_pretrained(trainer.logger.run_dir / "final")
    merged = hf_state_dict(trainer.policy)
    assert final.state_dict().keys() == merged.keys()
    assert all(torch.equal(final.state_dict()[k], merged[k]) for k in merged)


def test_lora_resume_after_crash_across_a_merge_is_bitwise(cfg_factory, monkeypatch):
    pytest.importorskip("peft")
    overrides = (*LORA, "trainer.spin.max_iterations=3", "trainer.spin.max_epochs=1",
                 "model.peft.lora_tuning.adapter_dropout=0.1")  # 6 steps; merges, then saves, after 2, 4, 6
    full = build_trainer(cfg_factory(*overrides, run_name="full"))
    full.fit()

    cfg = cfg_factory(*overrides, run_name="crashy")
    crash_at_step(build_trainer(cfg), 5, monkeypatch)
    resumed = build_trainer(cfg)  # from just after merge 2: fresh adapters, their AdamW state zeroed
    assert resumed.step == 4 and resumed.reference.checkpoint_state() == {"merges": 2}
    resumed.fit()  # through the merge at step 6, whose fresh adapters must be the same draw
    got, want = resumed.policy.state_dict(), full.policy.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    losses = [[r["train/loss"] for r in read_metrics(t.logger.run_dir) if "train/loss" in r] for t in (resumed, full)]
    assert losses[0] == losses[1]


def test_lora_trains_under_fp16_loss_scaling(cfg_factory):
    pytest.importorskip("peft")
    trainer = build_trainer(cfg_factory(*LORA, "trainer.precision=16-mixed", "trainer.spin.max_steps=3",
                                        "model.optim.sched.warmup_steps=0"))
    adapters = {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if p.requires_grad}
    trainer.fit()
    rows = [r for r in read_metrics(trainer.logger.run_dir) if "train/loss_scale" in r]
    assert len(rows) == 3 and all(math.isfinite(r["train/loss"]) for r in rows)
    now = dict(trainer.policy.named_parameters())
    assert all(not torch.equal(now[n], before) for n, before in adapters.items() if "lora_B" in n)  # B moved off 0
