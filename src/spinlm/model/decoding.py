"""A batched sampling loop that also returns the sampling model's log-probs, so the reference needs no second pass.

SPIN needs, under the reference policy, log p(generated answer | prompt) and log p(ground-truth
answer | prompt). The reference is the model that samples the generated answer, so:

- each sampled token's log-prob is the log-softmax of the RAW logits of its step (before
  repetition penalty, temperature, top-k/top-p), kept as it is sampled;
- the ground-truth answer is scored on the prompt's KV cache right after the prefill (the prompt
  is computed once for both), answers of similar length together, and the cache is left as it was.

So the separate reference pass over prompt + answer + generated answer disappears, except for
the answer tokens themselves. Where the time goes on a CPU, and what is done about it:

- prefill: openings shared by several prompts (system prompt, turn markers) are computed once,
  the rest in chunks of similar length, logits at the last prompt position only (`_prefill`);
- decoding steps: one KV buffer per layer preallocated for the whole answer (no per-step copy of
  the cache); finished rows leave the batch as soon as they stop;
- sampling: one uniform draw per row against the CDF (`_sample`), after Hugging Face's processors
  (repetition penalty on prompt + generated ids, min new tokens, temperature, top-k, top-p;
  greedy applies only the first two).

Tests: greedy output == HF ``generate`` (with shared openings too); log-probs == a fresh forward;
sampled frequencies == the processed distribution.
"""

from __future__ import annotations

import inspect
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from spinlm.model.logprobs import gather_logprobs, masked_logits

try:
    from transformers.cache_utils import DynamicCache, DynamicLayer
except ImportError:  # older transformers: no per-layer caches, so no cached decoding
    DynamicCache = DynamicLayer = None


@dataclass
class DecodedBatch:
    tokens: list[list[int]]                # new tokens per row, through the stop token (or max_new_tokens)
    token_logps: list[list[float]] | None  # the sampling model's log p of each of them (raw logits)
    answer_logps: list[float] | None       # sum log p(answer | prompt) of the given answers, if any
    answer_seconds: float = 0.0            # time spent scoring the answers


def supports_cached_decoding(model: nn.Module) -> bool:
    """True when the model's forward takes a cache, position ids and ``logits_to_keep`` (transformers >= 5)."""
    if DynamicLayer is None:
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
    answer_tokens_per_pass: int = 1024,
) -> DecodedBatch:
    """Sample continuations of ``prompts`` (non-empty) with ``model`` in eval mode, using the global RNG.

    ``stop_check(tokens) -> bool`` ends a row early (multi-token stop strings); ``answers``
    (one per prompt) are scored on the prompt cache.
    """
    device = next(model.parameters()).device
    cache_kw = _cache_kwarg(model)
    B = len(prompts)
    ids, prompt_mask = _pad(prompts, max(len(p) for p in prompts), pad_id, device)
    cache, logits, attn = _prefill(model, cache_kw, prompts, max_new_tokens, pad_id, device)

    answer_logps, answer_seconds = None, 0.0
    if answers is not None:
        t0 = time.perf_counter()
        answer_logps = _score_answers(model, cache, cache_kw, logits, attn, answers, pad_id, answer_tokens_per_pass)
        answer_seconds = time.perf_counter() - t0

    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    history = ids.masked_fill(prompt_mask == 0, -1)  # for the repetition penalty: prompt ids, pads never match
    alive = torch.arange(B, device=device)  # original row of each batch row
    next_pos = prompt_mask.sum(-1)
    tokens: list[list[int]] = [[] for _ in range(B)]
    logps: list[list[float]] = [[] for _ in range(B)]
    for step in range(max_new_tokens):
        scores = _process(logits, history, step, stop, min_new_tokens, repetition_penalty)
        if greedy:
            chosen = scores.argmax(dim=-1)
        else:
            scores = _warp(scores, temperature, top_k, top_p)
            chosen = _sample(torch.softmax(scores, dim=-1))
        chosen_logps = gather_logprobs(logits, chosen)  # of the raw logits
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


def _sample(probs: Tensor) -> Tensor:
    """One token per row drawn from ``probs`` (B, V) by inverting its CDF with one uniform draw.

    Same distribution as ``torch.multinomial(probs, 1)``, which draws an exponential per vocabulary
    entry (B x V random numbers a step, ~10 % of decoding time with a 49k vocabulary). The CDF is
    summed in float64 so a large vocabulary loses no tail mass; zero-probability tokens have empty
    intervals and are never drawn.
    """
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)
    u = torch.rand((probs.shape[0], 1), dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)


def _pad(rows: Sequence[Sequence[int]], width: int, pad_id: int, device, left: bool = True) -> tuple[Tensor, Tensor]:
    """(ids, attention mask), each (len(rows), width), rows padded on the left (or right)."""
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for r, p in enumerate(rows):
        if len(p):
            span = slice(width - len(p), width) if left else slice(0, len(p))
            ids[r, span] = torch.tensor(list(p), dtype=torch.long)
            attn[r, span] = 1
    return ids.to(device), attn.to(device)


def length_chunks(lengths: Sequence[int], overhead: int = 64, max_tokens: int = 8192) -> list[list[int]]:
    """Indices into ``lengths`` grouped into left-padded chunks of least total cost.

    A forward pass costs about its padded tokens plus a fixed ``overhead``: every weight is read
    once per pass, worth ~64 tokens of compute on a CPU. One chunk for a whole batch pays the
    longest prompt on every row; one chunk per length pays the overhead many times. Exact over
    the distinct lengths (dynamic programming), then chunks over ``max_tokens`` are split.
    """
    distinct = sorted(set(lengths))
    count = Counter(lengths)
    best, start = [0.0] + [float("inf")] * len(distinct), [0] * (len(distinct) + 1)
    for j in range(1, len(distinct) + 1):
        rows = 0
        for i in range(j, 0, -1):  # the last chunk holds lengths distinct[i-1 .. j-1]
            rows += count[distinct[i - 1]]
            cost = best[i - 1] + overhead + rows * distinct[j - 1]
            if cost < best[j]:
                best[j], start[j] = cost, i - 1
    by_length: dict[int, list[int]] = {}
    for r, n in enumerate(lengths):
        by_length.setdefault(n, []).append(r)
    chunks, j = [], len(distinct)
    while j:
        rows = [r for n in distinct[start[j]: j] for r in by_length[n]]
        per = max(1, max_tokens // distinct[j - 1])
        chunks[:0] = [rows[k: k + per] for k in range(0, len(rows), per)]
        j = start[j]
    return chunks


def prefix_groups(prompts: Sequence[Sequence[int]], min_shared: int = 4) -> list[tuple[int, list[int]]]:
    """[(shared prefix length, rows)]: rows whose prompts start alike, so the prefix is computed once.

    Chat prompts share their opening (system prompt, turn markers): on the bundled task half of
    the prompt tokens repeat an earlier row's. Rows are taken in sorted order; a row joins the
    current group while the tokens the group saves do not drop. Each row keeps at least its
    last token outside the prefix (it yields the first logits). A prefix of 0 means no sharing.
    """
    order = sorted(range(len(prompts)), key=lambda r: list(prompts[r]))
    groups: list[tuple[int, list[int]]] = []
    shared, rows = 0, []
    for r in order:
        p = prompts[r]
        if rows:
            prev = prompts[rows[-1]]
            common = next((k for k, (x, y) in enumerate(zip(prev, p)) if x != y), min(len(prev), len(p)))
            joined = min(shared, common, len(p) - 1)
            if joined >= min_shared and len(rows) * joined >= (len(rows) - 1) * shared:
                shared = joined
                rows.append(r)
                continue
            groups.append((shared if len(rows) > 1 else 0, rows))
        shared, rows = len(p) - 1, [r]
    return groups + [(shared if len(rows) > 1 else 0, rows)]


def _prefill(model: nn.Module, cache_kw: str, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int,
             device):
    """(KV cache of the prompts with room for ``max_new_tokens`` more, last-position logits (B, V), its attention mask).

    One left-padded forward of the whole batch would pay for the longest prompt on every row and
    recompute shared openings row by row (together ~70 % of that prefill on the bundled task).
    Instead the `prefix_groups` prefixes go through one forward, then the rest of every row, in
    `length_chunks`, on top of its group's prefix. A row's cache is [pad | prefix | pad | own
    tokens], right-aligned in one preallocated buffer per layer (`_SlabLayer`); the returned
    mask marks the holes and position ids count real tokens only, so attention sees exactly the prompt.
    """
    shared_groups = [(shared, rows) for shared, rows in prefix_groups(prompts) if shared]
    group_of, shared_of = [0] * len(prompts), [0] * len(prompts)  # row -> its prefix's row in the prefix pass, length
    for g, (shared, rows) in enumerate(shared_groups):
        for r in rows:
            group_of[r], shared_of[r] = g, shared
    prefix_cache = None
    if shared_groups:
        heads = [prompts[rows[0]][:shared] for shared, rows in shared_groups]
        ids, mask = _pad(heads, max(map(len, heads)), pad_id, device)
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    use_cache=True, logits_to_keep=1)
        prefix_cache = _out_cache(out)
    plan = []  # (rows of the chunk, prefix width, width after the prefix)
    for chunk in length_chunks([len(p) - k for p, k in zip(prompts, shared_of)]):
        plan.append((chunk, max(shared_of[r] for r in chunk), max(len(prompts[r]) - shared_of[r] for r in chunk)))
    width = max(pw + rest for _, pw, rest in plan)
    attn = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    slabs: list[_SlabLayer] = []
    logits = None
    for chunk, pw, rest in plan:
        ids, mask = _pad([prompts[r][shared_of[r]:] for r in chunk], rest, pad_id, device)
        sub = DynamicCache()
        if pw:
            which = torch.tensor([group_of[r] for r in chunk], device=device)
            for i, layer in enumerate(prefix_cache.layers):
                sub.update(layer.keys[which, :, -pw:], layer.values[which, :, -pw:], i)
            held = torch.tensor([shared_of[r] for r in chunk], device=device)
            mask = torch.cat([(torch.arange(pw, 0, -1, device=device) <= held[:, None]).long(), mask], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, pw:]
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    **{cache_kw: sub}, logits_to_keep=1)
        part, last = _out_cache(out), out.logits[:, -1].float()
        if logits is None:
            logits = last.new_empty((len(prompts), last.shape[-1]))
            slabs = [_SlabLayer(layer.keys, layer.values, len(prompts), width + max_new_tokens, width) for layer in part.layers]
        rows = torch.tensor(chunk, device=device)
        logits[rows] = last
        attn[rows, width - mask.shape[1]:] = mask
        for slab, layer in zip(slabs, part.layers):
            slab.put(rows, layer.keys, layer.values)
    cache = DynamicCache()
    cache.layers = slabs
    return cache, logits, attn


class _SlabLayer(DynamicLayer or object):
    """One layer's keys and values for every row in a buffer preallocated for the whole decode.

    A decoding step writes its column in place; a growing cache concatenates (copies) the whole
    cache every step instead (6 % of decoding time). ``keys`` / ``values`` are views of the
    filled part, as HF's attention reads them.
    """

    def __init__(self, keys: Tensor, values: Tensor, rows: int, capacity: int, filled: int):
        super().__init__()
        self.is_initialized = True
        # under autocast keys (after rotary, fp32) and values (bf16) can differ in dtype
        self._k = keys.new_zeros((rows, keys.shape[1], capacity, keys.shape[3]))
        self._v = values.new_zeros((rows, values.shape[1], capacity, values.shape[3]))
        self._len = filled
        self.device = keys.device
        self._view()

    def _view(self) -> None:
        self.keys, self.values = self._k[:, :, : self._len], self._v[:, :, : self._len]

    def put(self, rows: Tensor, keys: Tensor, values: Tensor) -> None:
        """Prefilled rows, right-aligned at the filled width (left padding stays zero, masked)."""
        self._k[rows, :, self._len - keys.shape[2]: self._len] = keys
        self._v[rows, :, self._len - values.shape[2]: self._len] = values

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        end = self._len + key_states.shape[2]
        if end > self._k.shape[2]:
            raise RuntimeError(f"KV cache full: {end} positions, room for {self._k.shape[2]}")
        self._k[:, :, self._len: end] = key_states
        self._v[:, :, self._len: end] = value_states
        self._len = end
        self._view()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._len + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def batch_select_indices(self, indices: Tensor) -> None:
        self._k, self._v = self._k[indices], self._v[indices]
        self._view()


def _score_answers(model, cache, cache_kw, first_logits: Tensor, attn: Tensor, answers, pad_id: int,
                   tokens_per_pass: int) -> list[float]:
    """sum log p(answer | prompt) per row, from the prefill's last logits and passes over the answers
    (of similar length, `length_chunks`) on copies of their rows of the prompt cache."""
    device = first_logits.device
    first = torch.log_softmax(first_logits, dim=-1)
    total = first[torch.arange(len(answers), device=device), torch.tensor([a[0] for a in answers], device=device)]
    # tokens 0..A-2 are inputs; they predict tokens 1..A-1
    for chunk in length_chunks([len(a) - 1 for a in answers], max_tokens=tokens_per_pass):
        longest = max(len(answers[r]) for r in chunk) - 1
        if longest == 0:
            continue
        rows = torch.tensor(chunk, device=device)
        inp, mask = _pad([answers[r][:-1] for r in chunk], longest, pad_id, device, left=False)
        sub = DynamicCache()
        for i, layer in enumerate(cache.layers):
            sub.update(layer.keys[rows], layer.values[rows], i)
        sub_attn = attn[rows]
        pos = sub_attn.sum(-1, keepdim=True) + torch.arange(longest, device=device)
        logits = masked_logits(model, mask.bool(), input_ids=inp, attention_mask=torch.cat([sub_attn, mask], dim=1),
                               position_ids=pos, use_cache=True, **{cache_kw: sub})
        targets = torch.cat([torch.tensor(list(answers[r][1:]), dtype=torch.long) for r in chunk]).to(device)
        token_logps = gather_logprobs(logits, targets)
        owner = torch.cat([torch.full((len(answers[r]) - 1,), r, dtype=torch.long) for r in chunk]).to(device)
        total = total.index_add(0, owner, token_logps)
    return total.tolist()
