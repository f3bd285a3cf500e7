"""Batch SPIN samples into the tensors NeMo-Aligner's `spin_custom_collate` produces."""

from __future__ import annotations

from collections.abc import Sequence

import torch

Ids = Sequence[int] | torch.Tensor


def pad_right(seqs: Sequence[Ids], pad: int) -> torch.Tensor:
    """(B, max_len) long tensor of `seqs`, right-padded with `pad`."""
    if len(seqs) == 0:
        raise ValueError("pad_right needs at least one sequence")
    rows = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in seqs]
    out = torch.full((len(rows), max(len(r) for r in rows)), pad, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def answer_mask(prompt_lengths: torch.Tensor, answer_lengths: torch.Tensor, length: int) -> torch.Tensor:
    """(B, length) bool, True exactly at positions P .. P+A-1 of each row (the answer)."""
    positions = torch.arange(length).unsqueeze(0)
    start = prompt_lengths.unsqueeze(1)
    return (positions >= start) & (positions < start + answer_lengths.unsqueeze(1))


def spin_custom_collate(
    batch: list[dict],
    eos_id: int,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
) -> dict[str, torch.Tensor]:
    """prompts_and_answers, masks, prompts_only, answers_only, prompt_lengths,
    combined_lengths (+ sample_index when items carry `index`), right-padded with eos_id.

    The reset_*/eod_mask_loss flags exist for NeMo interface compatibility; they control
    Megatron's packing of several documents into one sequence, which spinlm does not do
    (one conversation per row), so only False is accepted.
    """
    if reset_position_ids or reset_attention_mask or eod_mask_loss:
        raise NotImplementedError(
            "reset_position_ids, reset_attention_mask and eod_mask_loss are Megatron packing "
            "features; spinlm keeps one conversation per row, so they must be False"
        )
    if not batch:
        raise ValueError("cannot collate an empty batch")
    prompts = [_ids(item["prompt_ids"]) for item in batch]
    answers = [_ids(item["answer_ids"]) for item in batch]
    combined = [torch.cat([p, a]) for p, a in zip(prompts, answers)]
    prompt_lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    answer_lengths = torch.tensor([len(a) for a in answers], dtype=torch.long)
    prompts_and_answers = pad_right(combined, eos_id)
    out = {
        "prompts_and_answers": prompts_and_answers,
        "masks": answer_mask(prompt_lengths, answer_lengths, prompts_and_answers.shape[1]),
        "prompts_only": pad_right(prompts, eos_id),
        "answers_only": pad_right(answers, eos_id),
        "prompt_lengths": prompt_lengths,
        "combined_lengths": prompt_lengths + answer_lengths,
    }
    has_index = ["index" in item for item in batch]
    if all(has_index):
        out["sample_index"] = torch.tensor([int(item["index"]) for item in batch], dtype=torch.long)
    elif any(has_index):
        raise ValueError("either all or none of the batch items must have an 'index'")
    return out


def _ids(seq: Ids) -> torch.Tensor:
    return torch.as_tensor(seq, dtype=torch.long).reshape(-1)
