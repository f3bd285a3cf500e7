"""Tokenized SPIN samples with a stated length policy.

NeMo-Aligner never truncates training sequences, so one over-long conversation crashes or
runs out of memory mid-run. spinlm enforces the limits below and reports what it changed.

Length policy (`data.length_policy`):

- `max_seq_length` bounds prompt + answer, for the ground-truth and the generated answer.
- `max_prompt_length` bounds the prompt and so leaves room for generation: pass
  `max_seq_length - max_new_tokens`.
- "truncate" (default): a prompt longer than `max_prompt_length` keeps its LAST
  `max_prompt_length` tokens (the most recent context, ending with the assistant header);
  then an answer longer than `max_seq_length - len(prompt)` is cut to fit and so loses its
  end-of-turn marker. Counted as prompts cut / answers cut.
- "drop": any sample that would need either cut is dropped, counted.
- "error": any sample that would need either cut stops the run with a `DataError` naming
  its file and line, the lengths and the keys to change.
- Under both, a sample of which no answer token fits is dropped, counted.

The counts are logged at INFO as one line (`LengthReport.summary()`); if no sample
survives, `build_dataset` raises `DataError`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from spinlm.config import LENGTH_POLICIES, OPPONENT_KEY, resolve_limit
from spinlm.data.chat import GENERATED_COLUMN, Conversation
from spinlm.data.render import ChatRenderer
from spinlm.data.sources import DataSource, read_conversations
from spinlm.data.tokenize import default_workers, tokenize_conversations
from spinlm.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tokenizing:
    """How `build_dataset` tokenizes: see `spinlm.data.tokenize` (null workers = its default rule)."""

    workers: int | None = None
    cache_dir: Path | None = None
    with_generated: bool = False  # keep the data's `generated` answers as opponent answers
    show_progress: bool = True
    processes_per_node: int = 1  # ranks on this node share its CPU cores


@dataclass
class LengthReport:
    """What the length policy did to one file; `summary()` is the line users read."""

    total: int = 0
    kept: int = 0
    prompt_truncated: int = 0
    answer_truncated: int = 0
    dropped: int = 0
    source: str = ""
    policy: str = "truncate"
    max_seq_length: int = 0
    max_prompt_length: int = 0

    def summary(self) -> str:
        """One line, e.g. 'train.jsonl: 29 samples, 29 kept: 12 prompts cut ...'."""
        return (
            f"{self.source}: {self.total} samples, {self.kept} kept: "
            f"{self.prompt_truncated} prompts cut (kept the end), {self.answer_truncated} answers cut, "
            f"{self.dropped} dropped (policy={self.policy}, max_seq_length={self.max_seq_length}, "
            f"max_prompt_length={self.max_prompt_length})"
        )


class SPINDataset(torch.utils.data.Dataset):
    """Items are dict(prompt_ids, answer_ids, index); index is the item's position here,
    stable for the dataset's life, so generations can be matched back to their sample.

    Ids are kept as int32 arrays (views into one buffer when they come from `tokenize`) and handed
    out as lists. A sample may also carry `generated_ids` / `generated_truncated`: an opponent answer
    given by the data (the SPIN paper's `generated` column), see `opponent_answer`. Built with
    `turn_masks`, items also hold prompt_mask: True at the prompt's earlier assistant answers."""

    def __init__(self, samples: list[dict], report: LengthReport | None = None):
        self.samples = [_stored(s, i) for i, s in enumerate(samples)]
        self.report = report

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        item = {"prompt_ids": s["prompt_ids"].tolist(), "answer_ids": s["answer_ids"].tolist(), "index": s["index"]}
        if "prompt_mask" in s:
            item["prompt_mask"] = s["prompt_mask"].tolist()
        return item

    def opponent_answer(self, i: int) -> tuple[list[int], bool]:
        """(ids, truncated) of sample i's data-given opponent answer, cut to the generation budget."""
        s = self.samples[i]
        return s["generated_ids"].tolist(), bool(s["generated_truncated"])


def _stored(sample: dict, index: int) -> dict:
    out = {"prompt_ids": np.asarray(sample["prompt_ids"], dtype=np.int32),
           "answer_ids": np.asarray(sample["answer_ids"], dtype=np.int32), "index": index}
    if "prompt_mask" in sample:
        out["prompt_mask"] = np.asarray(sample["prompt_mask"], dtype=bool)
    if "generated_ids" in sample:
        out["generated_ids"] = np.asarray(sample["generated_ids"], dtype=np.int32)
        out["generated_truncated"] = bool(sample["generated_truncated"])
    return out


def check_lengths(max_seq_length: int, max_prompt_length: int, policy: str) -> None:
    """ConfigError unless 0 < max_prompt_length < max_seq_length and policy is known."""
    if max_seq_length <= 0 or max_prompt_length <= 0:
        raise ConfigError(
            f"max_seq_length ({max_seq_length}) and max_prompt_length ({max_prompt_length}) must be > 0"
        )
    if max_prompt_length >= max_seq_length:
        raise ConfigError(
            f"max_prompt_length ({max_prompt_length}) must be < max_seq_length ({max_seq_length}) "
            "to leave room for the answer"
        )
    if policy not in LENGTH_POLICIES:
        raise ConfigError(f"unknown length policy {policy!r}, expected one of {LENGTH_POLICIES}")


def fit_to_length(
    prompt: Sequence[int], answer: Sequence[int], max_seq_length: int, max_prompt_length: int, policy: str
) -> tuple[Sequence[int], Sequence[int], bool, bool] | None:
    """(prompt, answer, prompt_cut, answer_cut) under the length policy, or None if dropped."""
    prompt_cut = len(prompt) > max_prompt_length
    if prompt_cut:
        prompt = prompt[len(prompt) - max_prompt_length:]
    room = max_seq_length - len(prompt)
    answer_cut = len(answer) > room
    if answer_cut:
        answer = answer[:room]
    if len(answer) == 0 or (policy == "drop" and (prompt_cut or answer_cut)):
        return None
    return prompt, answer, prompt_cut, answer_cut


def build_dataset(
    data: DataSource | str | Path | Sequence[Conversation],
    renderer: ChatRenderer,
    max_seq_length: int,
    max_prompt_length: int,
    policy: str = "truncate",
    limit: int | None = None,
    skip_bad: bool = False,
    turn_masks: bool = False,
    tokenizing: Tokenizing | None = None,
) -> SPINDataset:
    """Read (any source `sources.read_conversations` takes, or conversations already read), render
    and length-fit the first `limit` conversations.

    `skip_bad` drops unusable records (counted, logged) instead of stopping at the first one;
    `turn_masks` adds each sample's prompt_mask (`ChatRenderer.earlier_answer_mask`).
    `tokenizing.with_generated` also keeps each conversation's `generated` answer as its opponent
    answer, cut to the generation budget `max_seq_length - max_prompt_length` like a sampled one."""
    check_lengths(max_seq_length, max_prompt_length, policy)
    tokenizing = tokenizing or Tokenizing()
    source = data if isinstance(data, DataSource) else DataSource(data)
    label = source.label
    conversations = read_conversations(source, skip_bad=skip_bad)[:limit]
    if tokenizing.with_generated:
        _require_generated(conversations)
    workers = tokenizing.workers or default_workers(len(conversations), tokenizing.processes_per_node)
    tokens = tokenize_conversations(conversations, renderer, workers, tokenizing.cache_dir,
                                    tokenizing.with_generated, label, tokenizing.show_progress)
    report = LengthReport(source=label, policy=policy, max_seq_length=max_seq_length,
                          max_prompt_length=max_prompt_length)
    samples = []
    for i, conv in enumerate(conversations):
        report.total += 1
        prompt_ids, answer_ids = tokens.get("prompt", i), tokens.get("answer", i)
        if policy == "error":
            _refuse_too_long(conv.source or label, len(prompt_ids), len(answer_ids), max_seq_length, max_prompt_length)
        fitted = fit_to_length(prompt_ids, answer_ids, max_seq_length, max_prompt_length, policy)
        if fitted is None:
            report.dropped += 1
            continue
        prompt, answer, prompt_cut, answer_cut = fitted
        report.kept += 1
        report.prompt_truncated += prompt_cut
        report.answer_truncated += answer_cut
        sample = {"prompt_ids": prompt, "answer_ids": answer}
        if turn_masks:  # a cut prompt keeps its end: so does its mask
            sample["prompt_mask"] = renderer.earlier_answer_mask(conv)[len(prompt_ids) - len(prompt):]
        generated = tokens.get("generated", i)
        if generated is not None:
            budget = max_seq_length - max_prompt_length
            sample.update(generated_ids=generated[:budget], generated_truncated=len(generated) > budget)
        samples.append(sample)
    log.info(report.summary())
    if not samples:
        raise DataError(f"{label}:0: no sample survives the length policy ({report.summary()})")
    return SPINDataset(samples, report)


def _require_generated(conversations: list[Conversation]) -> None:
    missing = next((c for c in conversations if c.generated is None), None)
    if missing is not None:
        raise DataError(f"{missing.source}: no '{GENERATED_COLUMN}' answer (SPIN paper format), but "
                        f"{OPPONENT_KEY}=true takes iteration 0's opponent answers from it")


def _refuse_too_long(where: str, prompt: int, answer: int, max_seq_length: int, max_prompt_length: int) -> None:
    """length_policy=error: a sample that does not fit is a DataError naming it and the numbers."""
    if prompt > max_prompt_length:
        problem = (f"prompt is {prompt} tokens, longer than max_prompt_length {max_prompt_length} "
                   f"(max_seq_length {max_seq_length} minus model.spin.length_params.max_length)")
    elif prompt + answer > max_seq_length:
        problem = f"sample is {prompt + answer} tokens (prompt {prompt} + answer {answer}), longer than max_seq_length {max_seq_length}"
    else:
        return
    raise DataError(f"{where}: {problem}; model.data.length_policy=error (set it to truncate or drop, or raise "
                    "model.data.*.max_seq_length)")


def subsample(dataset: SPINDataset, num_samples: int, seed: int) -> SPINDataset:
    """`num_samples` items chosen deterministically from `seed` (NeMo's data.sample=True).

    Whole shuffled passes are concatenated, so when `num_samples` exceeds the dataset every
    sample repeats equally often (to within one). The result is re-indexed from 0.
    """
    if num_samples <= 0:
        raise ConfigError(f"num_samples must be > 0, got {num_samples}")
    if len(dataset) == 0:
        raise DataError("cannot subsample an empty dataset")
    generator = torch.Generator().manual_seed(seed)
    passes = -(-num_samples // len(dataset))
    order = torch.cat([torch.randperm(len(dataset), generator=generator) for _ in range(passes)])
    chosen = [dataset.samples[i] for i in order[:num_samples].tolist()]
    return SPINDataset(chosen, dataset.report)


def validation_batches(n: int, global_batch_size: int, drop_last: bool, limit: int | float) -> list[list[int]]:
    """Fixed validation batches in dataset order, so that val/loss is comparable across validations
    (`limit`: trainer.spin.limit_val_batches)."""
    batches = [list(range(s, min(s + global_batch_size, n))) for s in range(0, n, global_batch_size)]
    if drop_last:
        batches = [b for b in batches if len(b) == global_batch_size]
    return batches[:resolve_limit(limit, len(batches), "trainer.spin.limit_val_batches")]
