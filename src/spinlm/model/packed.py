"""Score a ground-truth and a generated answer to the same prompt in ONE row, prompt counted once.

SPIN scores every pair (x, y) and (x, y') under the policy (with a graph) and the reference
(without). Two right-padded rows compute the prompt x twice, and a full LM head projects every
position onto the vocabulary (SmolLM2: 49,152 columns) although only answer positions are scored.
Here each pair is one row

    [ x (P tokens) | y (A tokens) | y' (G tokens) | pad ]

with position ids 0..P-1, P..P+A-1, P..P+G-1 (y' restarts after the prompt) and a per-row
attention mask: every token sees the prompt and the earlier tokens of its own answer, never the
other answer. The last prompt position predicts the first token of both answers. The model is
asked for logits only where an answer token is predicted (HF ``logits_to_keep`` with a boolean
(B, L) mask), so the LM head runs on the answer positions only (transformers 5.19 takes no mask:
there the head runs everywhere and the answer positions are selected, `logprobs.masked_logits`).

Exact up to float rounding: the test compares with two padded rows scored by
``masked_sum_logprobs``. It is the model's own forward (softcapping, scaling, DDP/FSDP hooks all
apply); it needs an attention implementation that takes a 4D mask (sdpa, eager). ``supports_packed_pairs``
says whether a model qualifies; callers fall back to padded rows otherwise.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from spinlm.model.loading import unwrap
from spinlm.model.logprobs import masked_logits, target_logprobs

_MASKED_ATTENTION = ("sdpa", "eager")


def supports_packed_pairs(model: nn.Module) -> bool:
    """True when the model takes a custom 4D mask, position ids and ``logits_to_keep``."""
    inner = unwrap(model)
    config = getattr(inner, "config", None)
    if getattr(config, "_attn_implementation", None) not in _MASKED_ATTENTION:
        return False
    params = inspect.signature(inner.forward).parameters
    return "logits_to_keep" in params and "position_ids" in params


@dataclass
class PackedPairs:
    """The model inputs of B packed rows and where each answer token's log-prob comes from."""

    input_ids: Tensor       # (B, L)
    position_ids: Tensor    # (B, L)
    attention_mask: Tensor  # (B, 1, L, L) bool, True = may attend
    keep: Tensor            # (B, L) bool: positions whose logits are computed (row-major order)
    source: Tensor          # (T,) index into the kept logits that predicts answer token t
    target: Tensor          # (T,) the answer token t
    owner: Tensor           # (T,) which of the 2B sums token t adds to: row b (actual) or B + b (generated)
    num_pairs: int


def pack_pairs(prompts: Sequence[Sequence[int]], actual: Sequence[Sequence[int]],
               generated: Sequence[Sequence[int]], pad_id: int) -> PackedPairs:
    """Build the packed rows of `pack_pairs`' module docstring (prompts and answers non-empty)."""
    rows = list(zip(prompts, actual, generated))
    if not rows:
        raise ValueError("pack_pairs needs at least one pair")
    B = len(rows)
    L = max(len(p) + len(a) + len(g) for p, a, g in rows)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    position_ids = torch.zeros((B, L), dtype=torch.long)
    segment = torch.full((B, L), 3, dtype=torch.long)  # 0 prompt, 1 actual, 2 generated, 3 pad
    keep = torch.zeros((B, L), dtype=torch.bool)
    src_cols, targets, owners = [], [], []
    for b, (p, a, g) in enumerate(rows):
        P, A, G = len(p), len(a), len(g)
        if P == 0 or A == 0:
            raise ValueError("pack_pairs: every prompt and ground-truth answer needs at least one token")
        input_ids[b, : P + A + G] = torch.tensor([*p, *a, *g], dtype=torch.long)
        position_ids[b, : P + A] = torch.arange(P + A)
        position_ids[b, P + A : P + A + G] = torch.arange(P, P + G)
        segment[b, :P], segment[b, P : P + A], segment[b, P + A : P + A + G] = 0, 1, 2
        # actual token j (column P+j) is predicted by column P+j-1; generated token j by
        # column P+A+j-1, except the first, which the last prompt column predicts
        act_cols = list(range(P - 1, P + A - 1))
        gen_cols = ([P - 1] + list(range(P + A, P + A + G - 1))) if G else []
        keep[b, act_cols] = True
        keep[b, gen_cols] = True
        src_cols.append((b, act_cols + gen_cols))
        targets += [*a, *g]
        owners += [b] * A + [B + b] * G
    # the kept logits come out flattened row-major: map (row, column) to its index there
    flat_index = torch.cumsum(keep.flatten(), 0).view(B, L) - 1
    source = torch.cat([flat_index[b, torch.tensor(cols, dtype=torch.long)] for b, cols in src_cols])
    seg_q, seg_k = segment.unsqueeze(2), segment.unsqueeze(1)
    causal = torch.ones((L, L), dtype=torch.bool).tril()
    allowed = (seg_k == 0) | (seg_k == seg_q)
    # a pad position attends to itself only: no fully masked row (NaN under SDPA)
    mask = (causal & allowed & (seg_q != 3)) | torch.eye(L, dtype=torch.bool)
    return PackedPairs(
        input_ids, position_ids, mask.unsqueeze(1), keep, source,
        torch.tensor(targets, dtype=torch.long), torch.tensor(owners, dtype=torch.long), B,
    )


def packed_pair_logprobs(model: nn.Module, packed: PackedPairs) -> tuple[Tensor, Tensor]:
    """((B,), (B,)): sum log p(actual | prompt), sum log p(generated | prompt) per pair, in float32.

    Keeps the graph (call under ``torch.no_grad`` for reference log-probs).
    """
    device = next(model.parameters()).device
    mask = packed.attention_mask.to(device)
    if getattr(unwrap(model).config, "_attn_implementation", None) == "eager":
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    logits = masked_logits(model, packed.keep.to(device), input_ids=packed.input_ids.to(device),
                           position_ids=packed.position_ids.to(device), attention_mask=mask, use_cache=False)
    logits = logits.reshape(-1, logits.shape[-1])  # (kept, V)
    token_logps = target_logprobs(logits, packed.source.to(device), packed.target.to(device))
    sums = torch.zeros(2 * packed.num_pairs, dtype=torch.float32, device=device)
    sums = sums.index_add(0, packed.owner.to(device), token_logps)
    return sums[: packed.num_pairs], sums[packed.num_pairs :]
