"""Pair sets: which iterations' answers make iteration t's pairs,
the opponent mixture, and the rescored reference log-probs (cached, recomputed after a loss)."""

from collections import Counter

import pytest
import torch
from omegaconf import OmegaConf

from spinlm.algorithms.pairs import PairSets, draw_opponent, epoch_pairs
from spinlm.algorithms.rollouts import Rollout, RolloutStore
from spinlm.errors import CheckpointError
from test_spin import cfg_factory  # noqa: F401 (fixture)


def order(s, e):
    """A fake data order: iteration s, epoch e visits the prompts in a distinct rotation."""
    return [(j + 3 * s + e) % 10 for j in range(10)]


def test_epoch_pairs_take_each_iterations_own_epoch():
    own = epoch_pairs(2, 1, order, per_set=4, mix_iterations=1, shuffle_seed=5)
    assert own == [(2, i) for i in order(2, 1)[:4]]  # k = 1: iteration t's own order, unshuffled
    mixed = epoch_pairs(2, 1, order, per_set=4, mix_iterations=2, shuffle_seed=5)
    assert Counter(mixed) == Counter([(1, i) for i in order(1, 1)[:4]] + [(2, i) for i in order(2, 1)[:4]])
    assert mixed != sorted(mixed)
    assert mixed == epoch_pairs(2, 1, order, per_set=4, mix_iterations=2, shuffle_seed=5)  # seeded
    assert mixed != epoch_pairs(2, 1, order, per_set=4, mix_iterations=2, shuffle_seed=6)
    assert epoch_pairs(2, 1, order, 4, 2, None) == [(1, i) for i in order(1, 1)[:4]] + [(2, i) for i in order(2, 1)[:4]]
    assert {s for s, _ in epoch_pairs(0, 0, order, 4, 3, 1)} == {0}  # iteration 0 has no earlier set
    assert {s for s, _ in epoch_pairs(5, 0, order, 4, 3, 1)} == {3, 4, 5}


def test_opponent_draws_earlier_answers_at_the_set_rate():
    answered = {0: set(range(1000)), 1: set(range(1000)), 2: set(range(500))}
    draws = [draw_opponent(7, 3, i, answered, prob=0.4, history=2) for i in range(1000)]
    assert draws == [draw_opponent(7, 3, i, answered, prob=0.4, history=2) for i in range(1000)]  # reproducible
    counts = Counter(draws)
    assert set(counts) == {1, 2, 3}  # never older than `history` iterations back
    assert 0.35 < (counts[1] + counts[2]) / 1000 < 0.45
    assert all(d != 2 for i, d in enumerate(draws) if i >= 500)  # iteration 2 did not answer those prompts
    assert all(draw_opponent(7, 3, i, answered, prob=0.0, history=2) == 3 for i in range(100))
    assert draw_opponent(7, 3, 5, {}, prob=1.0, history=3) == 3  # nothing earlier answered: its own answer
    assert Counter(draw_opponent(7, 3, i, answered, prob=1.0, history=3) for i in range(600)).keys() == {0, 1, 2}


def pair_cfg(**spin):
    return OmegaConf.create({
        "model": {"seed": 3, "data": {"train_ds": {"shuffle": True}},
                  "spin": {"mix_iterations": 1, "opponent_mix_prob": 0.0, "opponent_history": 1, **spin}},
        "trainer": {"spin": {"max_epochs": 2}},
    })


def fake_rollouts(iteration, indices):
    return {i: Rollout([100 * iteration + i, 7], False, -1.0 - i, -2.0 - i) for i in indices}


class Scorer:
    """A stand-in for the reference: a deterministic function of (prompt, answer); counts its calls."""

    def __init__(self, fail=False):
        self.calls, self.fail = [], fail

    def __call__(self, indices, generated):
        self.calls.append(len(indices))
        if self.fail:
            raise RuntimeError("killed during the recomputation")
        act = torch.tensor([-0.5 * i for i in indices])
        gen = torch.tensor([-0.25 * g[0] for g in generated])
        return act, gen


def stored_sets(tmp_path, cfg, iterations):
    store = RolloutStore(tmp_path / "rollouts")
    sets = PairSets(cfg, store, num_samples=12, per_set=4, score=Scorer())
    for t in range(iterations):
        rollouts = fake_rollouts(t, sets.own_prompts(t, range(2)))
        store.save(t, None, rollouts, {})
    return store, sets


def test_mixing_rescores_earlier_answers_under_the_current_reference(tmp_path):
    cfg = pair_cfg(mix_iterations=2)
    store, _ = stored_sets(tmp_path, cfg, 2)
    scorer = Scorer()
    sets = PairSets(cfg, store, 12, 4, scorer)
    own = store.load(1, None)
    keys, answers = sets.for_epoch(1, 0, own)
    assert len(keys) == 8 and Counter(s for s, _ in keys) == {0: 4, 1: 4}
    earlier = store.load(0, None)
    for (s, i) in keys:
        r = answers[(s, i)]
        if s == 1:
            assert r == own[i]  # iteration t's own answers keep the log-probs of its own generation pass
        else:
            assert r.generated_ids == earlier[i].generated_ids
            # scored again, not the stored log-probs of iteration 0's reference
            assert (r.ref_logp_actual, r.ref_logp_generated) == (-0.5 * i, -0.25 * earlier[i].generated_ids[0])
            assert r.ref_logp_generated != earlier[i].ref_logp_generated
    assert sets.pop_metrics()["train/pairs_earlier_answers"] == 4
    # every epoch's earlier answers were scored in one pass, and kept: epoch 1 and a resume reuse them
    first_pass = scorer.calls[0]
    assert first_pass == len({k for e in range(2) for k in sets.keys(1, e) if k[0] == 0})
    keys1, answers1 = sets.for_epoch(1, 1, own)
    resumed = PairSets(cfg, store, 12, 4, scorer)
    assert resumed.for_epoch(1, 1, own) == (keys1, answers1)
    assert scorer.calls == [first_pass]


def test_recomputation_lost_in_a_crash_is_done_again_identically(tmp_path):
    cfg = pair_cfg(mix_iterations=2)
    store, _ = stored_sets(tmp_path, cfg, 2)
    own = store.load(1, None)
    with pytest.raises(RuntimeError, match="killed"):
        PairSets(cfg, store, 12, 4, Scorer(fail=True)).for_epoch(1, 0, own)
    path = PairSets(cfg, store, 12, 4, Scorer()).rescored_store(1).path(0, None)
    assert not path.exists()  # nothing half-written
    first = PairSets(cfg, store, 12, 4, Scorer()).for_epoch(1, 0, own)
    path.write_text(path.read_text()[:40])  # a torn file is unreadable: scored again, same values
    again = Scorer()
    assert PairSets(cfg, store, 12, 4, again).for_epoch(1, 0, own) == first
    assert again.calls


def test_opponent_mixture_swaps_own_answers_for_earlier_ones(tmp_path):
    cfg = pair_cfg(opponent_mix_prob=0.5, opponent_history=2, mix_iterations=1)
    cfg.model.data.train_ds.shuffle = False  # every iteration answers the same prompts 0..3
    store, _ = stored_sets(tmp_path, cfg, 3)
    sets = PairSets(cfg, store, 12, 4, Scorer())
    keys, answers = sets.for_epoch(2, 0, store.load(2, None))
    assert [i for _, i in keys] == [0, 1, 2, 3]  # the same prompts in the same order: only the answer changes
    assert {s for s, _ in keys} <= {0, 1, 2}
    for s, i in keys:
        assert answers[(s, i)].generated_ids == [100 * s + i, 7]
    many = PairSets(cfg, store, 12, 4, Scorer())
    draws = [draw_opponent(3, 2, i, {0: {i}, 1: {i}}, 0.5, 2) for i in range(4)]
    assert [s for s, _ in many.keys(2, 0, {0: set(range(4)), 1: set(range(4)), 2: set(range(4))})] == draws


def test_missing_earlier_answers_are_an_error(tmp_path):
    cfg = pair_cfg(mix_iterations=2)
    store, _ = stored_sets(tmp_path, cfg, 2)
    store.path(0, None).unlink()
    with pytest.raises(CheckpointError, match="iter_0.jsonl is missing"):
        PairSets(cfg, store, 12, 4, Scorer()).for_epoch(1, 0, store.load(1, None))


# ----- in the trainer: a tiny model, 2 iterations x 2 epochs of 2 steps (iteration 1 doubles with mixing) ---
MIXED = ("model.spin.mix_iterations=2", "model.spin.opponent_mix_prob=0.5", "model.spin.opponent_history=1",
         "trainer.spin.save_interval=3")


def params(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def train_losses(run_dir):
    import json
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def test_mixed_run_trains_earlier_answers_against_the_current_reference(cfg_factory):
    import copy

    from spinlm.model.logprobs import masked_sum_logprobs
    from spinlm.data.collate import spin_custom_collate
    from spinlm.train import build_trainer

    trainer = build_trainer(cfg_factory(*MIXED, "exp_manager.checkpoint_callback_params.save_top_k=-1"))
    assert trainer.max_steps == 4 + 8
    seen = {}
    real = trainer._pair_batch

    def record(keys, answers):
        if trainer.iteration == 1 and 1 not in seen:  # iteration 1's reference: the policy before its first step
            seen["reference"] = copy.deepcopy(trainer.policy).eval()
        seen.setdefault(trainer.iteration, []).append((keys, answers))
        return real(keys, answers)

    trainer._pair_batch = record
    trainer.fit()
    assert {s for keys, _ in seen[0] for s, _ in keys} == {0}
    sources = Counter(s for keys, _ in seen[1] for s, _ in keys)
    assert sources[0] > 8  # the 8 mixed-in pairs of iteration 0, plus own pairs the mixture swapped
    assert sources[1] > 0
    run_dir = trainer.logger.run_dir
    assert (run_dir / "rollouts" / "rescored_for_iter_1" / "iter_0.jsonl").is_file()

    # the stored log-probs of the earlier answers are the reference of iteration 1 (the policy after
    # iteration 0), not iteration 0's
    ref = seen["reference"]
    _, answers = seen[1][0]
    old = [(k, r) for k, r in answers.items() if k[0] == 0]
    items = [trainer.train_dataset[i] for (_, i), _ in old]
    gen = spin_custom_collate([{"prompt_ids": it["prompt_ids"], "answer_ids": r.generated_ids}
                               for it, (_, r) in zip(items, old)], trainer.eos_id)
    act = spin_custom_collate(items, trainer.eos_id)
    with torch.no_grad():
        want_gen = masked_sum_logprobs(ref, gen["prompts_and_answers"], gen["masks"])
        want_act = masked_sum_logprobs(ref, act["prompts_and_answers"], act["masks"])
    got_gen = torch.tensor([r.ref_logp_generated for _, r in old])
    got_act = torch.tensor([r.ref_logp_actual for _, r in old])
    stored0 = trainer.rollouts.load(0, None)
    assert torch.allclose(got_gen, want_gen, atol=1e-4) and torch.allclose(got_act, want_act, atol=1e-4)
    assert not torch.allclose(got_gen, torch.tensor([stored0[i].ref_logp_generated for (_, i), _ in old]), atol=1e-2)


@pytest.mark.parametrize("crash", ["recomputation", "step 8"])
def test_mixed_run_resumes_bitwise(cfg_factory, monkeypatch, crash):
    from spinlm.algorithms.spin import SPINTrainer
    from spinlm.train import build_trainer

    full = build_trainer(cfg_factory(*MIXED, run_name="full"))
    full.fit()
    cfg = cfg_factory(*MIXED, run_name="crashy")
    real_score, real_step = SPINTrainer._reference_logprobs, SPINTrainer.train_single_step

    def crash_in_rescoring(self, indices, generated):
        if self.iteration == 1:  # scoring iteration 0's answers under iteration 1's reference
            raise RuntimeError("simulated crash")
        return real_score(self, indices, generated)

    def crash_at_step(self, batch):
        if self.step == 8:
            raise RuntimeError("simulated crash")
        return real_step(self, batch)

    if crash == "recomputation":
        monkeypatch.setattr(SPINTrainer, "_reference_logprobs", crash_in_rescoring)
    else:
        monkeypatch.setattr(SPINTrainer, "train_single_step", crash_at_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_trainer(cfg).fit()
    monkeypatch.setattr(SPINTrainer, "_reference_logprobs", real_score)
    monkeypatch.setattr(SPINTrainer, "train_single_step", real_step)
    resumed = build_trainer(cfg)
    assert resumed.step == {"recomputation": 3, "step 8": 6}[crash]
    resumed.fit()
    assert torch.equal(params(resumed.policy), params(full.policy))
    assert train_losses(resumed.logger.run_dir) == train_losses(full.logger.run_dir)
