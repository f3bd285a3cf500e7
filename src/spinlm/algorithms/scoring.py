"""Log-probs of SPIN pairs (ground-truth and generated answer to one prompt), policy and reference.

Packed rows (`spinlm.model.packed`: prompt once, answer-only logits) when the model supports
them, else two right-padded rows per pair (the general path). Both give the same sums up to
float rounding (tests/model/test_packed.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from spinlm.data.collate import pad_right
from spinlm.model.logprobs import masked_sum_logprobs
from spinlm.model.packed import pack_pairs, packed_pair_logprobs, supports_packed_pairs

Ids = Sequence[int]


def pair_logprobs(
    model: nn.Module, prompts: Sequence[Ids], actual: Sequence[Ids], generated: Sequence[Ids], pad_id: int,
    packed: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """((B,), (B,)) float32 sums of log p(actual | prompt) and log p(generated | prompt); keeps the graph.

    ``packed=None`` picks packed rows when the model supports them.
    """
    if packed is None:
        packed = supports_packed_pairs(model)
    if packed:
        return packed_pair_logprobs(model, pack_pairs(prompts, actual, generated, pad_id))
    device = next(model.parameters()).device
    rows = [[*p, *a] for p, a in zip(prompts, actual)] + [[*p, *g] for p, g in zip(prompts, generated)]
    starts = [len(p) for p in prompts] * 2
    ends = [len(r) for r in rows]
    tokens = pad_right(rows, pad_id)
    cols = torch.arange(tokens.shape[1])
    masks = (cols >= torch.tensor(starts)[:, None]) & (cols < torch.tensor(ends)[:, None])
    logps = masked_sum_logprobs(model, tokens.to(device), masks.to(device)).float()
    return logps[: len(prompts)], logps[len(prompts):]


def plan_pair_batches(prompts: Sequence[Ids], actual: Sequence[Ids], generated: Sequence[Ids],
                      micro_batch_size: int) -> list[list[int]]:
    """Pair indices in micro batches of similar total length (less padding); a function of the lengths only."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]) + len(actual[i]) + len(generated[i]), i))
    return [order[s:s + micro_batch_size] for s in range(0, len(order), micro_batch_size)]


@torch.no_grad()
def reference_pair_logprobs(
    model: nn.Module, prompts: Sequence[Ids], actual: Sequence[Ids], generated: Sequence[Ids], pad_id: int,
    micro_batch_size: int, autocast=None, batch_ids: Sequence[int | None] | None = None,
) -> tuple[Tensor, Tensor]:
    """Reference sums for a whole generated set, in the micro batches of `plan_pair_batches`.

    The micro batches are a function of the lengths only, so the result is deterministic. With
    `batch_ids` only those micro batches are scored (the others stay 0); a None entry is a dummy
    forward whose result is dropped (FSDP2 ranks must run the same number of forwards).
    """
    plan = plan_pair_batches(prompts, actual, generated, micro_batch_size)
    act, gen = torch.zeros(len(prompts)), torch.zeros(len(prompts))
    for b in range(len(plan)) if batch_ids is None else batch_ids:
        idx = plan[b] if b is not None else plan[0][:1]
        with autocast() if autocast is not None else contextlib.nullcontext():
            a, g = pair_logprobs(
                model, [prompts[i] for i in idx], [actual[i] for i in idx], [generated[i] for i in idx], pad_id
            )
        if b is not None:
            act[idx], gen[idx] = a.float().cpu(), g.float().cpu()
    return act, gen


def batch_pairs(batch: dict[str, Tensor], rows: slice) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """(prompts, actual answers, generated answers) as id lists for the given rows of a training batch."""
    prompts, actual, generated = [], [], []
    prompt_lengths = batch["prompt_lengths"][rows].tolist()
    act_lengths = batch["actual_mask"][rows].sum(dim=1).tolist()
    gen_lengths = batch["generated_lengths"][rows].tolist()
    for k, (p, a, g) in enumerate(zip(prompt_lengths, act_lengths, gen_lengths)):
        row = rows.start + k
        prompts.append(batch["actual"][row, :p].tolist())
        actual.append(batch["actual"][row, p:p + a].tolist())
        generated.append(batch["generated"][row, p:p + g].tolist())
    return prompts, actual, generated

