"""`spinlm sft`: SPIN's schedule and data with the ground-truth NLL, every-turn loss, early stopping, resume."""

import json

import pytest
import torch
from conftest import crash_at_step
from test_spin import cfg_factory, params_vector  # noqa: F401 (fixture)

from spinlm.algorithms import spin as spin_module
from spinlm.algorithms.sft import SFTTrainer
from spinlm.model.logprobs import masked_mean_nll
from spinlm.train import build_trainer, run

SFT = ("trainer.spin.max_epochs=1", "model.optim.sched.name=Constant")  # 2 blocks ("iterations") x 2 steps


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sft_trains_spins_prompts_on_their_ground_truth(cfg_factory):
    cfg = cfg_factory(*SFT, run_name="sft")
    spin = build_trainer(cfg_factory(*SFT, run_name="spin"))
    trainer = build_trainer(cfg, sft=True)
    assert trainer.reference is None and trainer.max_steps == spin.max_steps == 4
    start = [p.detach().clone() for p in trainer.policy.parameters()]
    seen, real = [], SFTTrainer.train_single_step

    def record(self, batch):
        seen.append(batch)
        return real(self, batch)

    trainer.train_single_step = record.__get__(trainer)
    trainer.fit()
    # the same prompts, in the same order, as SPIN's iterations (ground truth instead of pairs)
    spin_order = [i for t in range(2) for _, i in spin.pair_sets.keys(t, 0)[:8]]
    assert [i for b in seen for i in b["sample_index"].tolist()] == spin_order
    # the first step's loss is the token-mean NLL of the answers under the start model
    with torch.no_grad():
        for p, p0 in zip(trainer.policy.parameters(), start):
            p.copy_(p0)
        expected = masked_mean_nll(trainer.policy, seen[0]["tokens"], seen[0]["loss_mask"]).item()
    logged = [r for r in rows(trainer.logger.run_dir) if "train/loss" in r]
    assert logged[0]["train/loss"] == pytest.approx(expected, rel=1e-5)
    assert logged[-1]["train/loss"] < logged[0]["train/loss"]
    checkpoint = sorted((trainer.logger.run_dir / "checkpoints").iterdir())[-1]
    assert (checkpoint / "policy.safetensors").is_file() and not (checkpoint / "reference.safetensors").exists()
    assert (trainer.logger.run_dir / "final" / "model.safetensors").is_file()


def test_loss_on_every_assistant_turn(cfg_factory, tokenizer):
    final = build_trainer(cfg_factory(*SFT, run_name="final"), sft=True)
    every = build_trainer(cfg_factory(*SFT, "model.sft.loss_turns=all", run_name="all"), sft=True)
    multi = [i for i in range(len(every.train_dataset)) if any(every.train_dataset[i]["prompt_mask"])]
    assert multi, "the fixture has two-turn conversations"
    b_final, b_every = final._sft_batch(multi[:2]), every._sft_batch(multi[:2])
    assert torch.equal(b_final["tokens"], b_every["tokens"])
    extra = b_every["loss_mask"] & ~b_final["loss_mask"]
    assert tokenizer.decode(b_every["tokens"][0][extra[0]]) == "Hello, how can I help?<|im_end|>"
    assert torch.equal(b_final["loss_mask"], b_every["loss_mask"] & b_final["loss_mask"])


def test_sft_resumes_bitwise(cfg_factory, monkeypatch):
    full = run(cfg_factory(*SFT, "trainer.spin.save_interval=1", run_name="full"), sft=True)
    cfg = cfg_factory(*SFT, "trainer.spin.save_interval=1", run_name="crashy")
    crash_at_step(build_trainer(cfg, sft=True), 3, monkeypatch)
    resumed = build_trainer(cfg, sft=True)
    assert resumed.step == 3
    resumed.fit()
    assert torch.equal(params_vector(resumed.policy), params_vector(full.policy))
    losses = [[r["train/loss"] for r in rows(t.logger.run_dir) if "train/loss" in r] for t in (full, resumed)]
    assert losses[0] == losses[1]


def test_early_stopping_exports_the_best_checkpoint(cfg_factory, monkeypatch):
    scripted = iter([5.0, 4.0, 4.5, 4.6, 1.0, 1.0])  # val/loss per validation (nll, 1 token)
    monkeypatch.setattr(spin_module, "answer_nll_sharded", lambda *a, **k: (next(scripted), 1))
    cfg = cfg_factory("trainer.spin.max_epochs=4", "trainer.spin.val_check_interval=1",
                      "trainer.spin.save_interval=100", "model.sft.early_stopping_patience=2", run_name="early")
    trainer = build_trainer(cfg, sft=True)
    best_weights = {}
    real_save = SFTTrainer.save

    def save(self):
        best_weights[self.step] = params_vector(self.policy)
        real_save(self)

    monkeypatch.setattr(SFTTrainer, "save", save)
    trainer.fit()
    assert trainer.step == 4  # best at step 2, then two validations without improvement
    val = [r["val/loss"] for r in rows(trainer.logger.run_dir) if "val/loss" in r]
    assert val == [5.0, 4.0, 4.5, 4.6]
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(trainer.logger.run_dir / "final")
    assert torch.equal(params_vector(exported), best_weights[2])
    assert not torch.equal(best_weights[2], best_weights[4])
    again = build_trainer(cfg, sft=True)  # the finished run resumes at its end: nothing more to train
    assert again.step == 4 and again._done()
