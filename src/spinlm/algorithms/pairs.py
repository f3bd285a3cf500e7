"""Which pairs iteration t trains on: the step schedule, the last k iterations' pair sets, the opponent mixture.

A pair is (prompt i, its ground-truth answer, a generated answer). `PairKey` (s, i) names the
generated side: the answer the reference of iteration s gave to prompt i (`rollouts/iter_s.jsonl`).

- **Own pairs** (`model.spin.mix_iterations=1`, the default): epoch e of iteration t trains on the
  first steps_per_epoch x global_batch_size prompts of the seeded order of (t, e), each with the
  answer of iteration t's reference.
- **Data mixing** (`mix_iterations=k`, the paper trains iteration t on iterations t-1 and t: k=2):
  epoch e of iteration t trains on the pairs iterations t-k+1 .. t each train on in their own epoch
  e, shuffled together (seeded by t and e; no shuffle when `model.data.train_ds.shuffle=false`).
  So iteration t has min(t+1, k) times the steps of an iteration without mixing;
  `spinlm.schedule.StepSchedule` does the arithmetic and `trainer.spin.max_steps` still caps the run.
- **Opponent mixture** (`model.spin.opponent_mix_prob=p`, after Alami et al. 2024's fictitious
  play): each of iteration t's own pairs, with probability p, takes as its generated answer one
  that an earlier iterate (one of the last `opponent_history` iterations' references, uniformly, among those
  that answered that prompt) gave instead of iteration t's. A prompt no earlier iteration answered keeps its own.
  The draw is a function of (seed, t, i) only.

An answer from an earlier iteration is scored again under the *current* reference: the loss's
log-ratio is always taken against iteration t's reference. Those log-probs are computed once per
iteration, in the fixed micro batches of `scoring.plan_pair_batches`, and kept in
`rollouts/rescored_for_iter_t/` (written atomically), so every epoch and a resume reuse them; a
run killed during the computation computes them again from the checkpoint's reference, with the
same result. The earlier iterations' answers are read from `rollouts/`: mixing needs that
directory from the run's start.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

import torch
from omegaconf import DictConfig
from torch import Tensor

from spinlm.algorithms.rollouts import Rollout, RolloutStore
from spinlm.errors import CheckpointError
from spinlm.utils.distributed import broadcast_from_main, info

log = logging.getLogger(__name__)

PairKey = tuple[int, int]  # (iteration whose reference answered, training-set index)


def epoch_pairs(iteration: int, epoch: int, own_order: Callable[[int, int], list[int]], per_set: int,
                mix_iterations: int, shuffle_seed: int | None) -> list[PairKey]:
    """The pairs of (iteration, epoch) in training order, before the opponent mixture.

    `own_order(s, e)` is the prompt order of iteration s's epoch e; each set contributes its first
    `per_set` prompts. One set keeps its order; several are shuffled together (`shuffle_seed`)."""
    sources = range(max(0, iteration - mix_iterations + 1), iteration + 1)
    pairs = [(s, i) for s in sources for i in own_order(s, epoch)[:per_set]]
    if len(sources) > 1 and shuffle_seed is not None:
        g = torch.Generator().manual_seed(shuffle_seed)
        pairs = [pairs[j] for j in torch.randperm(len(pairs), generator=g).tolist()]
    return pairs


def draw_opponent(seed: int, iteration: int, index: int, answered: dict[int, set[int]], prob: float,
                  history: int) -> int:
    """The iteration whose answer to prompt `index` is iteration `iteration`'s generated side.

    With probability `prob` one of the last `history` earlier iterations that answered the prompt
    (uniformly); otherwise, or when none did, `iteration` itself. A function of its arguments only."""
    rng = random.Random(f"{seed}:{iteration}:{index}")
    earlier = [s for s in range(max(0, iteration - history), iteration) if index in answered.get(s, ())]
    if earlier and rng.random() < prob:
        return earlier[rng.randrange(len(earlier))]
    return iteration


class PairSets:
    """The data order and the pairs, with their answers, of each epoch (see the module docstring).

    `score(indices, generated)` returns the current reference's log-probs (actual, generated) of
    the given pairs, every rank calling it together; only rank 0 reads or writes files."""

    def __init__(self, cfg: DictConfig, store: RolloutStore, num_samples: int, per_set: int,
                 score: Callable[[list[int], list[list[int]]], tuple[Tensor, Tensor]]):
        spin = cfg.model.spin
        self.mix_iterations, self.prob, self.history = spin.mix_iterations, spin.opponent_mix_prob, spin.opponent_history
        self.seed, self.max_epochs = cfg.model.seed, cfg.trainer.spin.max_epochs
        self.shuffle = bool(cfg.model.data.train_ds.shuffle)
        self.store, self.num_samples, self.per_set, self.score = store, num_samples, per_set, score
        self.metrics: dict[str, float] = {}  # counts and timings of the last epoch's sets, for the trainer's log

    def own_order(self, iteration: int, epoch: int) -> list[int]:
        """The prompt order of iteration t's own epoch e: seeded by (seed, t, e), so a resume sees it again."""
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator().manual_seed(self.seed + 7919 * (iteration * self.max_epochs + epoch))
        return torch.randperm(self.num_samples, generator=g).tolist()

    def own_prompts(self, iteration: int, epochs: range) -> list[int]:
        """The prompts iteration t's own pairs use in `epochs`: those its reference answers."""
        return sorted({i for e in epochs for i in self.own_order(iteration, e)[:self.per_set]})

    @property
    def uses_earlier_answers(self) -> bool:
        return self.mix_iterations > 1 or self.prob > 0

    def keys(self, iteration: int, epoch: int, answered: dict[int, set[int]] | None = None) -> list[PairKey]:
        """(iteration, epoch)'s pairs in training order; `answered` (iteration -> prompts it answered)
        is needed for the opponent mixture."""
        shuffle_seed = self.seed + 15485863 * (iteration * self.max_epochs + epoch) if self.shuffle else None
        keys = epoch_pairs(iteration, epoch, self.own_order, self.per_set, self.mix_iterations, shuffle_seed)
        if self.prob > 0 and answered is not None:
            keys = [(draw_opponent(self.seed, iteration, i, answered, self.prob, self.history), i) if s == iteration
                    else (s, i) for s, i in keys]
        return keys

    def for_epoch(self, iteration: int, epoch: int, own: dict[int, Rollout]) -> tuple[list[PairKey], dict[PairKey, Rollout]]:
        """(keys in training order, the answer of each key with the current reference's log-probs)."""
        if not self.uses_earlier_answers:
            keys = self.keys(iteration, epoch)
            return keys, {k: own[k[1]] for k in keys}
        earlier = self._earlier_sets(iteration)
        answered = {**{s: set(r) for s, r in earlier.items()}, iteration: set(own)}
        keys = self.keys(iteration, epoch, answered)
        rescored = self._rescored(iteration, answered, earlier)
        self.metrics["train/pairs_earlier_answers"] = sum(s != iteration for s, _ in keys)
        return keys, {k: own[k[1]] if k[0] == iteration else rescored[k] for k in keys}

    def _earlier_sets(self, iteration: int) -> dict[int, dict[int, Rollout]]:
        first = max(0, iteration - max(self.mix_iterations - 1, self.history if self.prob > 0 else 0))
        sets = {}
        for s in range(first, iteration):
            own = self.own_prompts(s, range(self.max_epochs))
            loaded = broadcast_from_main(self.store.load(s, None, own) if info().is_main else None)
            if loaded is None:
                raise CheckpointError(
                    f"{self.store.path(s, None)} is missing or unreadable: iteration {iteration} trains on iteration "
                    f"{s}'s answers (model.spin.mix_iterations / opponent_mix_prob), which cannot be generated again"
                )
            sets[s] = loaded
        return sets

    def _rescored(self, iteration: int, answered: dict[int, set[int]],
                  earlier: dict[int, dict[int, Rollout]]) -> dict[PairKey, Rollout]:
        """The earlier answers any epoch of `iteration` uses, scored under the current reference (once).

        Kept per source iteration s in `rescored_store(iteration)`, as `iter_s.jsonl` in the rollouts'
        own format. All or none: a missing or unreadable file scores every answer again in the same
        micro batches, so the values are the same as the lost ones."""
        needed = sorted({k for e in range(self.max_epochs) for k in self.keys(iteration, e, answered) if k[0] != iteration})
        if not needed:
            return {}
        store = self.rescored_store(iteration)
        by_source = {s: [i for t, i in needed if t == s] for s in sorted({s for s, _ in needed})}
        loaded = [broadcast_from_main(store.load(s, None, idx) if info().is_main else None) for s, idx in by_source.items()]
        if all(x is not None for x in loaded):
            return {(s, i): r for s, rollouts in zip(by_source, loaded) for i, r in rollouts.items()}
        t0 = time.perf_counter()
        act, gen = self.score([i for _, i in needed], [earlier[s][i].generated_ids for s, i in needed])
        out = {(s, i): Rollout(earlier[s][i].generated_ids, earlier[s][i].truncated, a, g)
               for (s, i), a, g in zip(needed, act.tolist(), gen.tolist())}
        if info().is_main:
            for s in by_source:
                store.save(s, None, {i: r for (t, i), r in out.items() if t == s}, {})
        seconds = time.perf_counter() - t0
        self.metrics.update({"timing/rescore_s": seconds, "train/rescored_pairs": len(needed)})
        log.info("iteration %d: %d earlier answers scored under the current reference in %.1fs",
                 iteration, len(needed), seconds)
        return out

    def pop_metrics(self) -> dict[str, float]:
        metrics, self.metrics = self.metrics, {}
        return metrics

    def rescored_store(self, iteration: int) -> RolloutStore:
        """`rollouts/rescored_for_iter_t/iter_s.jsonl`: iteration s's answers, scored under iteration t's reference."""
        return RolloutStore(self.store.directory / f"rescored_for_iter_{iteration}", self.store.vocab_size)
