"""Sample answers to tokenized prompts with Hugging Face ``generate``, keeping the sampled token ids.

Two measured pitfalls shape this module (see SPIN_REFERENCE.md): ``generate(do_sample=True)``
silently fills unset sampling fields from the model's ``generation_config`` (top_k=50), and
decoding + re-encoding an answer changes its token ids. So every sampling field is explicit,
the model's own generation config is hidden during the call, and answers are returned as the
sampled ids, cut after the stop token, with nothing appended to a truncated one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase

from spinlm.model.decoding import decode_batch, supports_cached_decoding
from spinlm.model.loading import unwrap


@dataclass
class SamplingParams:
    """NeMo-Aligner's ``sampling_params`` + ``length_params``; lengths count new tokens."""

    use_greedy: bool = False  # argmax decoding instead of sampling
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k filtering
    top_p: float = 1.0  # 1.0 = no nucleus filtering
    repetition_penalty: float = 1.0  # 1.0 = no penalty
    end_strings: list[str] = field(default_factory=lambda: ["<|endoftext|>", "<extra_id_1>"])  # plus eos
    max_length: int = 256  # maximum new tokens
    min_length: int = 1  # minimum new tokens before a stop token may be sampled


@dataclass
class Generations:
    """Sampled answers in prompt order, as sampled: the stop token is kept, nothing is appended."""

    ids: list[list[int]]
    truncated: list[bool]  # True when cut off by max_length before any stop
    # the sampling model's own log-probs (cached decoding only; None from HF generate):
    logps: list[float] | None = None  # sum log p(answer | prompt) of each sampled answer
    answer_logps: list[float] | None = None  # sum log p(given answer | prompt), when `answers` were passed
    answer_seconds: float = 0.0  # time spent scoring the given answers

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.ids]

    @property
    def num_truncated(self) -> int:
        return sum(self.truncated)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, end_strings: list[str]) -> list[int]:
    """Ids of the end strings that are single tokens, plus the tokenizer's eos id."""
    ids = [i for i in (_single_token_id(tokenizer, s) for s in end_strings) if i is not None]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(ids))


def _single_token_id(tokenizer: PreTrainedTokenizerBase, text: str) -> int | None:
    token_id = tokenizer.convert_tokens_to_ids(text)
    if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
        return token_id
    encoded = tokenizer.encode(text, add_special_tokens=False)
    return encoded[0] if len(encoded) == 1 else None


def _multi_token_end_strings(tokenizer: PreTrainedTokenizerBase, end_strings: list[str]) -> list[str]:
    return [s for s in end_strings if _single_token_id(tokenizer, s) is None]


def build_generation_config(
    params: SamplingParams, stop_ids: list[int], pad_token_id: int, stop_strings: list[str]
) -> GenerationConfig:
    """A GenerationConfig from scratch; top_k=0 is passed as 0 (HF then adds no top-k warper)."""
    return GenerationConfig(
        do_sample=not params.use_greedy,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        min_p=0.0,
        typical_p=1.0,
        repetition_penalty=params.repetition_penalty,
        no_repeat_ngram_size=0,
        max_new_tokens=params.max_length,
        min_new_tokens=params.min_length,
        eos_token_id=stop_ids,
        pad_token_id=pad_token_id,
        stop_strings=stop_strings or None,
        num_beams=1,
        num_return_sequences=1,
        use_cache=True,
    )


@contextlib.contextmanager
def _isolated_generation_config(model: nn.Module) -> Iterator[None]:
    """Hide the model's generation_config: HF fills every unset field from it, even with generation_config=."""
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


@contextlib.contextmanager
def _seeded(seed: int | None, model: nn.Module) -> Iterator[None]:
    """Sample from a private RNG stream: the caller's global RNG state is the same afterwards,
    so training randomness does not depend on whether generation ran (or was read from disk)."""
    if seed is None:
        yield
        return
    device = _model_device(model)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def plan_batches(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
    """Prompt indices grouped into generation batches of similar length (less padding).

    The plan depends only on the prompts and the batch size, and each batch is sampled from its
    own seed, so a batch's answers do not depend on which process generates it or in what order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def batch_seed(generator_seed: int | None, batch_index: int) -> int | None:
    """The seed of one planned batch: distinct per batch, reproducible from the run's seed."""
    return None if generator_seed is None else generator_seed * 1_000_003 + batch_index


def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    params: SamplingParams,
    batch_size: int = 32,
    generator_seed: int | None = None,
    show_progress: bool = False,
    answers: list[list[int]] | None = None,
    cached_decoding: bool | None = None,
) -> Generations:
    """Sample one answer per prompt, batch by batch as `plan_batches` groups them.

    ``generator_seed`` seeds a private RNG stream per batch (the global RNG state is left as it
    was), so the same prompts, weights and seed regenerate identical answers: the trainer seeds
    per iteration so a resumed run regenerates what the interrupted one did.
    """
    plan = plan_batches(prompts, batch_size)
    rows, answer_seconds = generate_planned(
        model, tokenizer, prompts, params, plan, range(len(plan)), generator_seed,
        show_progress=show_progress, answers=answers, cached_decoding=cached_decoding,
    )
    return collect_generations(rows, len(prompts), answer_seconds)


GeneratedRow = tuple[list[int], bool, "float | None", "float | None"]  # ids, truncated, logp, answer logp


def collect_generations(rows: dict[int, GeneratedRow], n: int, answer_seconds: float = 0.0) -> Generations:
    """`Generations` in prompt order from the rows of `generate_planned` (of one or several ranks)."""
    ordered = [rows[i] for i in range(n)]
    logps = [r[2] for r in ordered]
    answer_logps = [r[3] for r in ordered]
    return Generations(
        ids=[r[0] for r in ordered], truncated=[r[1] for r in ordered],
        logps=logps if ordered and logps[0] is not None else None,
        answer_logps=answer_logps if ordered and answer_logps[0] is not None else None,
        answer_seconds=answer_seconds,
    )


def generate_planned(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    params: SamplingParams,
    plan: list[list[int]],
    batch_ids: Sequence[int | None],
    generator_seed: int | None = None,
    show_progress: bool = False,
    answers: list[list[int]] | None = None,
    cached_decoding: bool | None = None,
) -> tuple[dict[int, GeneratedRow], float]:
    """({prompt index: (ids, truncated, logp, answer logp)}, seconds scoring `answers`) for the
    planned batches `batch_ids` of `plan`.

    Batch b samples from seed `batch_seed(generator_seed, b)` wherever it runs. A None entry is
    a dummy step (one prompt, answer dropped). Log-probs come with cached decoding only (None otherwise).
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    model = unwrap(model)
    stop_ids = stop_token_ids(tokenizer, params.end_strings)
    stop_strings = _multi_token_end_strings(tokenizer, params.end_strings)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    config = build_generation_config(params, stop_ids, pad_id, stop_strings)
    if cached_decoding is None:
        cached_decoding = supports_cached_decoding(model)
    if answers is not None and not cached_decoding:
        raise ValueError("generate: scoring `answers` needs cached decoding")
    out: dict[int, GeneratedRow] = {}
    answer_seconds = 0.0
    stop_set = set(stop_ids)
    # FSDP2 reuses its all-gather buffers after this call: inference tensors would poison them
    no_grad = torch.no_grad() if isinstance(model, FSDPModule) else torch.inference_mode()
    with _eval_mode(model), _isolated_generation_config(model), no_grad:
        for b in tqdm(batch_ids, desc="Generating", disable=not show_progress):
            batch = plan[b] if b is not None else plan[0][:1]
            with _seeded(batch_seed(generator_seed, b if b is not None else 0), model):
                if cached_decoding:
                    decoded = decode_batch(
                        model, [prompts[i] for i in batch], pad_id=pad_id, stop_ids=stop_ids,
                        max_new_tokens=params.max_length, min_new_tokens=params.min_length,
                        greedy=params.use_greedy, temperature=params.temperature, top_k=params.top_k,
                        top_p=params.top_p, repetition_penalty=params.repetition_penalty,
                        stop_check=(lambda t: _completes_stop_string(t, stop_strings, tokenizer)) if stop_strings else None,
                        answers=None if answers is None else [answers[i] for i in batch],
                    )
                    new_tokens = decoded.tokens
                    answer_seconds += decoded.answer_seconds
                else:
                    new_tokens = _generate_batch(model, tokenizer, [prompts[i] for i in batch], config, pad_id)
            if b is None:
                continue
            for k, (i, row) in enumerate(zip(batch, new_tokens)):
                ids, truncated = _cut_at_stop(row, stop_set, stop_strings, tokenizer)
                logp = sum(decoded.token_logps[k][: len(ids)]) if cached_decoding else None
                answer_logp = decoded.answer_logps[k] if cached_decoding and answers is not None else None
                out[i] = (ids, truncated, logp, answer_logp)
    return out, answer_seconds


def _generate_batch(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    config: GenerationConfig,
    pad_id: int,
) -> list[list[int]]:
    """Left-pad (decoder-only generate continues from the last column) and return the new tokens per row."""
    input_ids, attention_mask = _left_pad(prompts, pad_id, _model_device(model))
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        generation_config=config,
        tokenizer=tokenizer if config.stop_strings else None,
    )
    return output[:, input_ids.shape[1] :].tolist()


def _left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _cut_at_stop(
    tokens: list[int], stop_ids: set[int], stop_strings: list[str], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], bool]:
    """Keep tokens through the first stop (a stop id, or the token completing a stop string).

    What follows is the padding generate appends to finished rows. Returns (ids, truncated).
    """
    # decoding every prefix is quadratic: only do it when the row contains a stop string at all
    scan_strings = stop_strings if _completes_stop_string(tokens, stop_strings, tokenizer) else []
    for end, token in enumerate(tokens, start=1):
        if token in stop_ids or _completes_stop_string(tokens[:end], scan_strings, tokenizer):
            return tokens[:end], False
    return tokens, True


def _completes_stop_string(tokens: list[int], stop_strings: list[str], tokenizer: PreTrainedTokenizerBase) -> bool:
    """True once the decoded text contains a stop string; called on growing prefixes, so the first
    True is the token that completes it (HF's StopStringCriteria rule)."""
    if not stop_strings:
        return False
    text = tokenizer.decode(tokens)
    return any(s in text for s in stop_strings)
