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
from dataclasses import dataclass
from pathlib import Path

import torch

from spinlm.data.chat import read_chat_jsonl
from spinlm.data.render import ChatRenderer
from spinlm.config import LENGTH_POLICIES, resolve_limit
from spinlm.errors import ConfigError, DataError

log = logging.getLogger(__name__)


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
    stable for the dataset's life, so generations can be matched back to their sample. Built with
    `turn_masks`, items also hold prompt_mask: True at the prompt's earlier assistant answers."""

    def __init__(self, samples: list[dict], report: LengthReport | None = None):
        self.samples = [{**_copy(s), "index": i} for i, s in enumerate(samples)]
        self.report = report

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return {**_copy(self.samples[i]), "index": self.samples[i]["index"]}


def _copy(sample: dict) -> dict:
    keys = ("prompt_ids", "answer_ids", "prompt_mask") if "prompt_mask" in sample else ("prompt_ids", "answer_ids")
    return {k: list(sample[k]) for k in keys}


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
    prompt: list[int], answer: list[int], max_seq_length: int, max_prompt_length: int, policy: str
) -> tuple[list[int], list[int], bool, bool] | None:
    """(prompt, answer, prompt_cut, answer_cut) under the length policy, or None if dropped."""
    prompt_cut = len(prompt) > max_prompt_length
    if prompt_cut:
        prompt = prompt[len(prompt) - max_prompt_length:]
    room = max_seq_length - len(prompt)
    answer_cut = len(answer) > room
    if answer_cut:
        answer = answer[:room]
    if not answer or (policy == "drop" and (prompt_cut or answer_cut)):
        return None
    return prompt, answer, prompt_cut, answer_cut


def build_dataset(
    path: str | Path,
    renderer: ChatRenderer,
    max_seq_length: int,
    max_prompt_length: int,
    policy: str = "truncate",
    limit: int | None = None,
    skip_bad: bool = False,
    turn_masks: bool = False,
) -> SPINDataset:
    """Read, render and length-fit a chat JSONL file (the first `limit` conversations).

    `skip_bad` drops unusable records (counted, logged) instead of stopping at the first one;
    `turn_masks` adds each sample's prompt_mask (`ChatRenderer.earlier_answer_mask`)."""
    check_lengths(max_seq_length, max_prompt_length, policy)
    conversations = read_chat_jsonl(path, skip_bad=skip_bad)[:limit]
    report = LengthReport(
        source=str(path), policy=policy, max_seq_length=max_seq_length, max_prompt_length=max_prompt_length
    )
    samples = []
    for conv in conversations:
        report.total += 1
        prompt_ids, answer_ids = renderer.render(conv)
        if policy == "error":
            _refuse_too_long(conv.source or str(path), len(prompt_ids), len(answer_ids), max_seq_length,
                             max_prompt_length)
        fitted = fit_to_length(prompt_ids, answer_ids, max_seq_length, max_prompt_length, policy)
        if fitted is None:
            report.dropped += 1
            continue
        prompt, answer, prompt_cut, answer_cut = fitted
        report.kept += 1
        report.prompt_truncated += prompt_cut
        report.answer_truncated += answer_cut
        samples.append({"prompt_ids": prompt, "answer_ids": answer})
        if turn_masks:  # a cut prompt keeps its end: so does its mask
            samples[-1]["prompt_mask"] = renderer.earlier_answer_mask(conv)[len(prompt_ids) - len(prompt):]
    log.info(report.summary())
    if not samples:
        raise DataError(f"{path}:0: no sample survives the length policy ({report.summary()})")
    return SPINDataset(samples, report)


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
