"""A batched sampling loop that also returns the sampling model's log-probs, so the reference needs no second pass.

SPIN needs, under the reference policy, log p(generated answer | prompt) and log p(ground-truth
answer | prompt). The reference is the model that samples the generated answer, so:

- each sampled token's log-prob is the log-softmax of the RAW logits of its step (before
  repetition penalty, temperature, top-k/top-p), kept as it is sampled;
- the ground-truth answer is scored on the prompt's KV cache right after the prefill (the prompt
  is computed once for both), a few rows at a time, and the cache is left as it was.

So the separate reference pass over prompt + answer + generated answer disappears, except for
the answer tokens themselves. Decoding details: left-padded prompts (sorted by length by the
caller), logits of the last prompt position only at prefill, finished rows dropped from the batch
(and their cache rows) as soon as they stop, sampling as Hugging Face's processors do it
(repetition penalty on prompt + generated ids, min new tokens, temperature, top-k, top-p; greedy
applies only the first two). Tests: greedy output == HF ``generate``; log-probs == a fresh forward.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class DecodedBatch:
    tokens: list[list[int]]                # new tokens per row, through the stop token (or max_new_tokens)
    token_logps: list[list[float]]         # the sampling model's log p of each of them (raw logits)
    answer_logps: list[float] | None       # sum log p(answer | prompt) of the given answers, if any
    answer_seconds: float = 0.0            # time spent scoring the answers


def supports_cached_decoding(model: nn.Module) -> bool:
    """True when the model's forward takes a cache, position ids and ``logits_to_keep`` (transformers >= 5)."""
    try:
        from transformers import DynamicCache  # noqa: F401
    except ImportError:
        return False
    params = inspect.signature(model.forward).parameters
    if not (("cache" in params or "past_key_values" in params) and "logits_to_keep" in params and "position_ids" in params):
        return False
    # the answer scoring copies rows of a plain (full-attention) KV cache; sliding-window or
    # recurrent layers keep other state: those models use HF generate and a separate reference pass
    config = getattr(model, "config", None)
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    return not getattr(config, "sliding_window", None) and all(t == "full_attention" for t in layer_types)


def _cache_kwarg(model: nn.Module) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _out_cache(out):
    return getattr(out, "cache", None) if getattr(out, "cache", None) is not None else out.past_key_values


@torch.inference_mode()
def decode_batch(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    stop_ids: Sequence[int],
    max_new_tokens: int,
    min_new_tokens: int = 0,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    stop_check=None,
    answers: Sequence[Sequence[int]] | None = None,
    answer_rows_per_pass: int = 8,
) -> DecodedBatch:
    """Sample continuations of ``prompts`` (non-empty) with ``model`` in eval mode, using the global RNG.

    ``stop_check(tokens) -> bool`` ends a row early (multi-token stop strings); ``answers``
    (one per prompt) are scored on the prompt cache.
    """
    device = next(model.parameters()).device
    cache_kw = _cache_kwarg(model)
    B = len(prompts)
    width = max(len(p) for p in prompts)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    attn = torch.zeros((B, width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        attn[r, width - len(p):] = 1
    ids, attn = ids.to(device), attn.to(device)
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=attn, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache, logits = _out_cache(out), out.logits[:, -1].float()

    answer_logps, answer_seconds = None, 0.0
    if answers is not None:
        t0 = time.perf_counter()
        answer_logps = _score_answers(model, cache, cache_kw, logits, attn, answers, pad_id, answer_rows_per_pass)
        answer_seconds = time.perf_counter() - t0

    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    history = ids.masked_fill(attn == 0, -1)  # for the repetition penalty: prompt ids, pads never match
    alive = torch.arange(B, device=device)  # original row of each batch row
    next_pos = positions[:, -1] + 1
    tokens: list[list[int]] = [[] for _ in range(B)]
    logps: list[list[float]] = [[] for _ in range(B)]
    for step in range(max_new_tokens):
        log_norm = torch.logsumexp(logits, dim=-1)  # of the raw logits: log p without a (B, V) log-softmax
        scores = _process(logits, history, step, stop, min_new_tokens, repetition_penalty)
        if greedy:
            chosen = scores.argmax(dim=-1)
        else:
            scores = _warp(scores, temperature, top_k, top_p)
            chosen = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        chosen_logps = logits.gather(1, chosen[:, None]).squeeze(1) - log_norm
        done = torch.isin(chosen, stop)
        for k, (row, tok, lp) in enumerate(zip(alive.tolist(), chosen.tolist(), chosen_logps.tolist())):
            tokens[row].append(tok)
            logps[row].append(lp)
            if stop_check is not None and not done[k] and stop_check(tokens[row]):
                done[k] = True
        if step == max_new_tokens - 1:
            break
        if done.any():
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            _select_rows(cache, keep)
            alive, chosen, attn, next_pos, history = alive[keep], chosen[keep], attn[keep], next_pos[keep], history[keep]
        attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], dim=1)
        history = torch.cat([history, chosen[:, None]], dim=1)
        out = model(input_ids=chosen[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                    use_cache=True, **{cache_kw: cache}, logits_to_keep=1)
        cache, logits = _out_cache(out), out.logits[:, -1].float()
        next_pos = next_pos + 1
    return DecodedBatch(tokens, logps, answer_logps, answer_seconds)


def _process(logits: Tensor, history: Tensor, step: int, stop: Tensor, min_new: int, penalty: float) -> Tensor:
    """HF's RepetitionPenalty then MinNewTokens processors (the ones greedy decoding applies too).

    The penalty applies to the ids of the prompt and of the answer so far; unlike HF with left
    padding, the pad id of padded rows is not penalised (history marks pads as -1).
    """
    scores = logits
    if penalty != 1.0:
        valid = history >= 0
        counts = torch.zeros_like(scores).scatter_add_(1, history.clamp(min=0), valid.to(scores.dtype))
        penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
        scores = torch.where(counts > 0, penalised, scores)
    if step < min_new and stop.numel():
        scores = scores.clone() if scores is logits else scores
        scores[:, stop] = float("-inf")
    return scores


def _warp(scores: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """HF's Temperature, TopK, TopP warpers in that order (each filters to -inf)."""
    if temperature != 1.0:
        scores = scores / temperature
    if top_k and top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= (1 - top_p)
        remove_sorted[:, -1] = False  # keep at least one token
        remove = remove_sorted.scatter(1, order, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores


def _select_rows(cache, keep: Tensor) -> None:
    for layer in cache.layers:
        layer.batch_select_indices(keep)


def _score_answers(model, cache, cache_kw, first_logits: Tensor, attn: Tensor, answers, pad_id: int,
                   rows_per_pass: int) -> list[float]:
    """sum log p(answer | prompt) per row, from the prefill's last logits and one pass over the answer
    on (a copy of the rows of) the prompt cache."""
    from transformers import DynamicCache

    device = first_logits.device
    first = torch.log_softmax(first_logits, dim=-1)
    total = []
    for s in range(0, len(answers), rows_per_pass):
        rows = torch.arange(s, min(s + rows_per_pass, len(answers)), device=device)
        chunk = [list(answers[r]) for r in rows.tolist()]
        sums = first[rows, torch.tensor([a[0] for a in chunk], device=device)]
        longest = max(len(a) for a in chunk)
        if longest > 1:
            # tokens 0..A-2 are inputs; they predict tokens 1..A-1
            inp = torch.full((len(chunk), longest - 1), pad_id, dtype=torch.long, device=device)
            mask = torch.zeros((len(chunk), longest - 1), dtype=torch.long, device=device)
            for k, a in enumerate(chunk):
                inp[k, : len(a) - 1] = torch.tensor(a[:-1], device=device)
                mask[k, : len(a) - 1] = 1
            sub = DynamicCache()
            for i, layer in enumerate(cache.layers):
                sub.update(layer.keys[rows], layer.values[rows], i)
            sub_attn = attn[rows]
            pos = sub_attn.sum(-1, keepdim=True) + torch.arange(longest - 1, device=device)
            logits = model(input_ids=inp, attention_mask=torch.cat([sub_attn, mask], dim=1), position_ids=pos,
                           use_cache=True, **{cache_kw: sub}, logits_to_keep=mask.bool()).logits.float()
            targets = torch.cat([torch.tensor(a[1:], dtype=torch.long) for a in chunk]).to(device)
            token_logps = logits.gather(-1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
            owner = torch.cat([torch.full((len(a) - 1,), k, dtype=torch.long) for k, a in enumerate(chunk)]).to(device)
            sums = sums.index_add(0, owner, token_logps)
        total += sums.tolist()
    return total
