"""The reference policy's answers for one iteration (or epoch), kept on disk in the run directory.

The reference is fixed within an iteration, so its answers and its log-probs of both answers
are computed once and reused by every epoch, and by a resumed run: a JSONL file per set,
written atomically, one line per training sample.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from spinlm.utils.checkpoint import atomic_write_text

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    generated_ids: list[int]        # the sampled answer tokens, exactly as sampled
    truncated: bool                 # cut off by max_length (no end token)
    ref_logp_actual: float          # reference policy: sum log p(ground-truth answer | prompt)
    ref_logp_generated: float       # reference policy: sum log p(generated answer | prompt)


class RolloutStore:
    """`rollouts/iter_{t}.jsonl` (or `iter_{t}_epoch_{e}.jsonl` when regenerating each epoch)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def path(self, iteration: int, epoch: int | None) -> Path:
        name = f"iter_{iteration}" if epoch is None else f"iter_{iteration}_epoch_{epoch}"
        return self.directory / f"{name}.jsonl"

    def load(self, iteration: int, epoch: int | None) -> dict[int, Rollout] | None:
        """The stored set, or None when there is none or it is unreadable (then it is made again:
        generation is seeded, so the new set equals the lost one)."""
        path = self.path(iteration, epoch)
        if not path.exists():
            return None
        out: dict[int, Rollout] = {}
        try:
            for line in path.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                out[row["index"]] = Rollout(
                    row["generated_ids"], row["truncated"], row["ref_logp_actual"], row["ref_logp_generated"]
                )
        except (ValueError, KeyError, TypeError) as err:
            log.warning("%s is unreadable (%s); generating this set again", path, err)
            return None
        return out

    def save(self, iteration: int, epoch: int | None, rollouts: dict[int, Rollout], texts: dict[int, str]) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(iteration, epoch)
        lines = [
            json.dumps({"index": i, **r.__dict__, "text": texts.get(i, "")}, ensure_ascii=False)
            for i, r in sorted(rollouts.items())
        ]
        atomic_write_text(path, "".join(line + "\n" for line in lines))
        return path
