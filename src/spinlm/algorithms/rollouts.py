"""The reference policy's answers for one iteration (or epoch), kept on disk in the run directory.

The reference is fixed within an iteration, so its answers and its log-probs of both answers
are computed once and reused by every epoch, and by a resumed run: a JSONL file per set,
written atomically, one line per training sample.

A stored set is data from the run directory, read as JSON and checked before it is trained on:
a row of the wrong shape, a token id outside the vocabulary or a set whose samples differ from
the ones the iteration needs makes the set unreadable, and it is generated again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from spinlm.config import OPPONENT_KEY
from spinlm.model.generation import Generations
from spinlm.utils.checkpoint import atomic_write_text

log = logging.getLogger(__name__)


def opponent_answers_from_data(dataset, indices: list[int], iteration: int, spin_cfg) -> Generations | None:
    """Iteration 0's opponent answers as the data gives them (`model.spin.first_opponent_from_data`,
    the SPIN paper's `generated` column), in place of sampling: ids cut to the generation budget and
    flagged as truncated like a sampled answer. None when the reference must generate. They get
    their reference log-probs, and are stored and reused, as generated ones are."""
    if not spin_cfg.first_opponent_from_data or iteration != 0:
        return None
    answers = [dataset.opponent_answer(i) for i in indices]
    log.info("iteration 0: the %d opponent answers are the training data's 'generated' answers (%s=true); "
             "nothing is generated", len(answers), OPPONENT_KEY)
    return Generations(ids=[ids for ids, _ in answers], truncated=[cut for _, cut in answers])


@dataclass
class Rollout:
    generated_ids: list[int]        # the sampled answer tokens, exactly as sampled
    truncated: bool                 # cut off by max_length (no end token)
    ref_logp_actual: float          # reference policy: sum log p(ground-truth answer | prompt)
    ref_logp_generated: float       # reference policy: sum log p(generated answer | prompt)


class RolloutStore:
    """`rollouts/iter_{t}.jsonl` (or `iter_{t}_epoch_{e}.jsonl` when regenerating each epoch);
    `vocab_size` bounds the token ids a stored set may hold."""

    def __init__(self, directory: str | Path, vocab_size: int | None = None):
        self.directory = Path(directory)
        self.vocab_size = vocab_size

    def path(self, iteration: int, epoch: int | None) -> Path:
        name = f"iter_{iteration}" if epoch is None else f"iter_{iteration}_epoch_{epoch}"
        return self.directory / f"{name}.jsonl"

    def load(self, iteration: int, epoch: int | None, indices: list[int] | None = None) -> dict[int, Rollout] | None:
        """The stored set (for exactly the samples `indices`, when given), or None when there is none
        or it is unreadable (then it is made again: generation is seeded, so the new set equals the lost one)."""
        path = self.path(iteration, epoch)
        if not path.exists():
            return None
        out: dict[int, Rollout] = {}
        try:
            for line in path.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                out[_int(row["index"])] = self._rollout(row)
            if indices is not None and set(out) != set(indices):
                raise ValueError(f"it holds other samples than iteration {iteration} trains on")
        except (ValueError, KeyError, TypeError) as err:
            log.warning("%s is unreadable (%s); generating this set again", path, err)
            return None
        return out

    def _rollout(self, row: dict) -> Rollout:
        ids = [_int(t) for t in row["generated_ids"]]
        if any(t < 0 or (self.vocab_size is not None and t >= self.vocab_size) for t in ids):
            raise ValueError(f"sample {row['index']}: a token id outside the vocabulary (0..{self.vocab_size})")
        if not isinstance(row["truncated"], bool):
            raise TypeError(f"sample {row['index']}: truncated must be true or false")
        return Rollout(ids, row["truncated"], _float(row["ref_logp_actual"]), _float(row["ref_logp_generated"]))

    def save(self, iteration: int, epoch: int | None, rollouts: dict[int, Rollout], texts: dict[int, str]) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(iteration, epoch)
        lines = [
            json.dumps({"index": i, **r.__dict__, "text": texts.get(i, "")}, ensure_ascii=False)
            for i, r in sorted(rollouts.items())
        ]
        atomic_write_text(path, "".join(line + "\n" for line in lines))
        return path


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)
