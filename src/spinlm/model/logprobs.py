"""Per-token log-probabilities of given sequences under a causal LM.

Sequences are RIGHT-padded and scored without an attention mask: with causal attention a real
token only attends to earlier positions, so pads after it cannot change its logits. Pad
positions get (meaningless) log-probs that the masks exclude. This avoids building masks and
keeps the forward identical to the one used for a single unpadded sequence.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn


@functools.cache
def keeps_logits_by_mask() -> bool:
    """True when transformers' ``logits_to_keep`` takes a boolean (B, L) mask (newer transformers 5.x;
    5.19, which vLLM pins, takes only a count or 1D positions)."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep  # noqa: F401
    except ImportError:
        return False
    return True


def masked_logits(model: nn.Module, keep: Tensor, **inputs) -> Tensor:
    """(K, V) logits at the K positions where the boolean (B, L) `keep` is True, the LM head run only
    there when transformers can (else over every position, then selected)."""
    if keeps_logits_by_mask():
        return model(**inputs, logits_to_keep=keep).logits
    return model(**inputs, logits_to_keep=0).logits[keep]


def token_logprobs(model: nn.Module, input_ids: Tensor) -> Tensor:
    """(B, L) log p(input_ids[:, i] | input_ids[:, :i]) for i >= 1; column 0 has no context and is 0."""
    logits = model(input_ids=input_ids).logits[:, :-1]
    scores = gather_logprobs(logits, input_ids[:, 1:])
    return torch.nn.functional.pad(scores, (1, 0), value=0.0)


def gather_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log_softmax at the targets only, in float32: (..., V) logits, (...) targets (`target_logprobs`: the
    float32 upcast a few rows at a time, no (..., V) log_softmax tensor)."""
    flat = logits.reshape(-1, logits.shape[-1])
    rows = torch.arange(flat.shape[0], device=flat.device)
    return target_logprobs(flat, rows, targets.reshape(-1)).reshape(targets.shape)


class _TargetLogprobs(torch.autograd.Function):
    """log_softmax(logits)[rows, targets] in float32, never holding a float32 copy of all the logits.

    The float32 upcast and the softmax are made `chunk` rows at a time, in the forward and again in the
    backward; what the graph keeps is the logits as they came (bf16 under bf16) and one logsumexp per
    row. A plain `log_softmax(logits.float())[rows, targets]` keeps a float32 (K, V) output for its
    backward and builds two more float32 (K, V) tensors in it: on a 49k vocabulary, 290 kept positions
    cost ~55 MiB each (a 7B run's 1k answer tokens x 128k vocabulary: 0.5 GiB each)."""

    @staticmethod
    def forward(ctx, logits: Tensor, rows: Tensor, targets: Tensor, chunk: int) -> Tensor:
        lse = _row_logsumexp(logits, chunk)
        ctx.save_for_backward(logits, rows, targets, lse)
        ctx.chunk = chunk
        return logits[rows, targets].float() - lse[rows]

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, rows, targets, lse = ctx.saved_tensors
        # d out_k / d logits[r] = onehot(target_k) - softmax(logits[r]) for r = rows[k]
        per_row = torch.zeros_like(lse).index_add_(0, rows, grad.float())
        out = torch.empty_like(logits)
        for s in range(0, logits.shape[0], ctx.chunk):
            probs = logits[s:s + ctx.chunk].to(torch.float32, copy=True).sub_(lse[s:s + ctx.chunk, None]).exp_()
            out[s:s + ctx.chunk] = probs.mul_(-per_row[s:s + ctx.chunk, None])
        out.index_put_((rows, targets), grad.to(out.dtype), accumulate=True)
        return out, None, None, None


def target_logprobs(logits: Tensor, rows: Tensor, targets: Tensor, chunk: int = 16) -> Tensor:
    """(T,) float32 log_softmax(logits[rows[t]])[targets[t]] of (K, V) logits, with a graph that keeps no
    float32 copy of them (`_TargetLogprobs`); rows may repeat (two answers predicted from one position)."""
    if not torch.is_grad_enabled() or not logits.requires_grad:
        return logits[rows, targets].float() - _row_logsumexp(logits, chunk)[rows]
    return _TargetLogprobs.apply(logits, rows, targets, chunk)


def _row_logsumexp(logits: Tensor, chunk: int) -> Tensor:
    """(K,) float32 logsumexp of each row of (K, V) logits, upcast `chunk` rows at a time."""
    return torch.cat([torch.logsumexp(c.float(), dim=-1) for c in logits.split(chunk)])


def masked_sum_logprobs(
    model: nn.Module, input_ids: Tensor, masks: Tensor, micro_batch_size: int | None = None
) -> Tensor:
    """(B,) sum of token log-probs where ``masks`` is True (the answer tokens): log p(answer | prompt).

    With ``micro_batch_size`` the batch is scored in chunks under ``torch.no_grad`` (reference
    log-probs need no graph and chunks bound peak memory); without it the result keeps its graph.
    """
    if micro_batch_size is None:
        return _masked_sum(model, input_ids, masks)
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    with torch.no_grad():
        chunks = [
            _masked_sum(model, ids, m)
            for ids, m in zip(input_ids.split(micro_batch_size), masks.split(micro_batch_size))
        ]
    return torch.cat(chunks)


def answer_logprob_sums(model: nn.Module, input_ids: Tensor, masks: Tensor) -> Tensor:
    """(B,) as ``masked_sum_logprobs`` (keeps the graph), with the LM head only at the positions that
    predict a masked token: for SFT on CPU the head over every prompt position is most of the step."""
    keep = torch.zeros_like(masks, dtype=torch.bool)
    keep[:, :-1] = masks[:, 1:].bool()  # position j predicts token j + 1
    logits = masked_logits(model, keep, input_ids=input_ids, use_cache=False)
    logits = logits.reshape(-1, logits.shape[-1])  # (kept, V), row-major
    targets = input_ids[:, 1:][keep[:, :-1]]
    token_logps = target_logprobs(logits, torch.arange(len(targets), device=logits.device), targets)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(keep)[keep]
    return torch.zeros(input_ids.shape[0], device=logits.device).index_add(0, rows, token_logps)


def _masked_logprobs(model: nn.Module, input_ids: Tensor, masks: Tensor) -> Tensor:
    """Token log-probs with unscored positions set to exactly 0 (where, not multiply: no 0 * -inf)."""
    return torch.where(masks.bool(), token_logprobs(model, input_ids), 0.0)


def _masked_sum(model: nn.Module, input_ids: Tensor, masks: Tensor) -> Tensor:
    return _masked_logprobs(model, input_ids, masks).sum(dim=-1)


def masked_mean_nll(model: nn.Module, input_ids: Tensor, masks: Tensor) -> Tensor:
    """Scalar negative log-likelihood averaged over all masked tokens of the batch (the SFT loss)."""
    count = masks.sum()
    if count == 0:
        raise ValueError("masked_mean_nll: the masks select no tokens")
    return -_masked_logprobs(model, input_ids, masks).sum() / count
