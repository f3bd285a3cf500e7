"""Sampling answers to tokenized prompts, keeping the sampled token ids: the generation backends.

A backend (`GenerationBackend`) samples one answer per prompt. Two decode on the model itself,
inside the training process: `DecoderBackend` (spinlm's cached decoder, `model/decoding.py`, which
also scores the reference's log-probs in the same pass) and `HFGenerateBackend` (Hugging Face
``generate``). The vLLM engine (`model/vllm_engine.py`) keeps its own copy of the weights, which
`sync_weights` pushes in place. `model/backends.py` picks one from `model.spin.generation_backend`.

Two measured pitfalls shape every backend (see SPIN_REFERENCE.md): ``generate(do_sample=True)``
silently fills unset sampling fields from the model's ``generation_config`` (top_k=50), and
decoding + re-encoding an answer changes its token ids. So every sampling field is explicit,
the model's own generation config is hidden during the call, and answers are returned as the
sampled ids, cut after the stop token (`StopRule`), with nothing appended to a truncated one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase

from spinlm.model.decoding import DecodedBatch, decode_batch, supports_cached_decoding
from spinlm.model.loading import unwrap
from spinlm.model.parallel import gathered
from spinlm.utils.distributed import all_gather_objects, info, my_share


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
    # the sampling model's own log-probs (cached decoding only; None from the other backends):
    logps: list[float] | None = None  # sum log p(answer | prompt) of each sampled answer
    answer_logps: list[float] | None = None  # sum log p(given answer | prompt), when `answers` were passed
    answer_seconds: float = 0.0  # time spent scoring the given answers

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.ids]

    @property
    def num_truncated(self) -> int:
        return sum(self.truncated)


class GenerationBackend:
    """What samples the reference's answers (`model.spin.generation_backend`).

    `generate` answers every prompt (all ranks call it together and all get every answer).
    An engine that keeps its own copy of the weights takes the reference's by `sync_weights`,
    which the trainer calls before each generation; the backends that decode with `module`
    itself ignore it (and never ask for the weights: under torchrun that is a gather).
    """

    name = "base"

    def sync_weights(self, weights: Callable[[], Mapping[str, Tensor]]) -> None:
        """Take the weights `weights()` gives (plain Hugging Face names, e.g. `reference.state_dict`)
        for the next generation; not called here."""

    def generate(
        self, module: nn.Module, prompts: list[list[int]], params: SamplingParams, seed: int | None = None,
        answers: list[list[int]] | None = None, show_progress: bool = False,
    ) -> Generations:
        """One answer per prompt. `seed` makes sampling reproducible; `answers` (one per prompt)
        are scored under `module` where the backend can do it in the same pass."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the backend holds (an engine, its memory); no-op here."""


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


class StopRule:
    """Where an answer ends, the same for every backend: at a stop id (an end string that is one
    token, or eos), or at the token whose decoded text completes a longer end string."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, end_strings: list[str]) -> None:
        self.tokenizer = tokenizer
        self.ids = stop_token_ids(tokenizer, end_strings)
        self.strings = [s for s in end_strings if _single_token_id(tokenizer, s) is None]

    def completes_string(self, tokens: list[int]) -> bool:
        """True once the decoded text contains a stop string; called on growing prefixes, so the first
        True is the token that completes it (HF's StopStringCriteria rule)."""
        if not self.strings:
            return False
        text = self.tokenizer.decode(tokens)
        return any(s in text for s in self.strings)

    def cut(self, tokens: list[int]) -> tuple[list[int], bool]:
        """(tokens through the first stop, truncated = no stop at all). What follows a stop is
        padding (generate) or nothing."""
        stop_ids = set(self.ids)
        # decoding every prefix is quadratic: only do it when the row contains a stop string at all
        scan = self.completes_string(tokens)
        for end, token in enumerate(tokens, start=1):
            if token in stop_ids or (scan and self.completes_string(tokens[:end])):
                return tokens[:end], False
        return tokens, True


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


def sub_seed(seed: int | None, index: int) -> int | None:
    """The seed of one planned batch (or, for an engine that seeds each request, one prompt):
    distinct per index, reproducible from the run's seed."""
    return None if seed is None else seed * 1_000_003 + index


GeneratedRow = tuple[list[int], bool, "float | None", "float | None"]  # ids, truncated, logp, answer logp


def collect_generations(rows: dict[int, GeneratedRow], n: int, answer_seconds: float = 0.0) -> Generations:
    """`Generations` in prompt order from {prompt index: row}, gathered from every rank."""
    merged: dict[int, GeneratedRow] = {}
    for part in all_gather_objects(rows):
        merged.update(part)
    ordered = [merged[i] for i in range(n)]
    logps = [r[2] for r in ordered]
    answer_logps = [r[3] for r in ordered]
    return Generations(
        ids=[r[0] for r in ordered], truncated=[r[1] for r in ordered],
        logps=logps if ordered and logps[0] is not None else None,
        answer_logps=answer_logps if ordered and answer_logps[0] is not None else None,
        answer_seconds=answer_seconds,
    )


def check_prompts(prompts: list[list[int]]) -> None:
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")


class PlannedBackend(GenerationBackend):
    """Decodes with the model itself, in batches planned as one process plans them (`plan_batches`),
    batch b sampled from `sub_seed(seed, b)` wherever it runs, dealt round-robin to the ranks.

    The answers therefore do not depend on the world size. Under FSDP2 the model is all-gathered for
    the call (`parallel.gathered`): each rank then decodes its own batches with no collective per token.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, batch_size: int = 32) -> None:
        self.tokenizer, self.batch_size = tokenizer, batch_size

    def decode(self, model: nn.Module, prompts: list[list[int]], params: SamplingParams, stop: StopRule,
               answers: list[list[int]] | None) -> DecodedBatch:
        """New tokens of one batch (the global RNG is seeded for it)."""
        raise NotImplementedError

    def generate(
        self, module: nn.Module, prompts: list[list[int]], params: SamplingParams, seed: int | None = None,
        answers: list[list[int]] | None = None, show_progress: bool = False,
    ) -> Generations:
        check_prompts(prompts)
        plan = plan_batches(prompts, self.batch_size)
        stop = StopRule(self.tokenizer, params.end_strings)
        model = unwrap(module)
        rows: dict[int, GeneratedRow] = {}
        answer_seconds = 0.0
        # FSDP2 reuses its all-gather buffers after this call: inference tensors would poison them
        no_grad = torch.no_grad() if isinstance(model, FSDPModule) else torch.inference_mode()
        with gathered(module), _eval_mode(model), _isolated_generation_config(model), no_grad:
            for b in tqdm(my_share(len(plan)), desc="Generating", disable=not (show_progress and info().is_main)):
                batch = plan[b]
                with _seeded(sub_seed(seed, b), model):
                    decoded = self.decode(model, [prompts[i] for i in batch], params, stop,
                                          None if answers is None else [answers[i] for i in batch])
                answer_seconds += decoded.answer_seconds
                for k, i in enumerate(batch):
                    ids, truncated = stop.cut(decoded.tokens[k])
                    logp = sum(decoded.token_logps[k][: len(ids)]) if decoded.token_logps is not None else None
                    rows[i] = (ids, truncated, logp, decoded.answer_logps[k] if decoded.answer_logps else None)
        return collect_generations(rows, len(prompts), answer_seconds)


class HFGenerateBackend(PlannedBackend):
    """Hugging Face ``generate`` with a GenerationConfig built from scratch (`model.spin.generation_backend=hf`)."""

    name = "hf"

    def decode(self, model: nn.Module, prompts: list[list[int]], params: SamplingParams, stop: StopRule,
               answers: list[list[int]] | None) -> DecodedBatch:
        pad_id = _pad_id(self.tokenizer, stop)
        config = build_generation_config(params, stop.ids, pad_id, stop.strings)
        input_ids, attention_mask = _left_pad(prompts, pad_id, _model_device(model))
        output = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
            tokenizer=self.tokenizer if config.stop_strings else None,
        )
        return DecodedBatch(output[:, input_ids.shape[1]:].tolist(), token_logps=None, answer_logps=None)


class DecoderBackend(PlannedBackend):
    """spinlm's cached decoder (`model.spin.generation_backend=spinlm`): it keeps each sampled token's
    log-prob and scores the given answers on the prompt's KV cache, so the reference needs no second
    pass. Models it cannot decode (sliding-window or recurrent layers) go through ``generate``."""

    name = "spinlm"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, batch_size: int = 32) -> None:
        super().__init__(tokenizer, batch_size)
        self.fallback = HFGenerateBackend(tokenizer, batch_size)

    def decode(self, model: nn.Module, prompts: list[list[int]], params: SamplingParams, stop: StopRule,
               answers: list[list[int]] | None) -> DecodedBatch:
        if not supports_cached_decoding(model):
            return self.fallback.decode(model, prompts, params, stop, None)
        return decode_batch(
            model, prompts, pad_id=_pad_id(self.tokenizer, stop), stop_ids=stop.ids,
            max_new_tokens=params.max_length, min_new_tokens=params.min_length, greedy=params.use_greedy,
            temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
            repetition_penalty=params.repetition_penalty,
            stop_check=stop.completes_string if stop.strings else None, answers=answers,
        )


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
    """Sample one answer per prompt with the decoder on the model itself (HF ``generate`` when
    `cached_decoding` is False), batch by batch as `plan_batches` groups them.

    ``generator_seed`` seeds a private RNG stream per batch (the global RNG state is left as it
    was), so the same prompts, weights and seed regenerate identical answers: the trainer seeds
    per iteration so a resumed run regenerates what the interrupted one did.
    """
    backend = (HFGenerateBackend if cached_decoding is False else DecoderBackend)(tokenizer, batch_size)
    if answers is not None and not (cached_decoding is not False and supports_cached_decoding(unwrap(model))):
        raise ValueError("generate: scoring `answers` needs cached decoding")
    return backend.generate(model, prompts, params, generator_seed, answers=answers, show_progress=show_progress)


def _pad_id(tokenizer: PreTrainedTokenizerBase, stop: StopRule) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop.ids[0]


def _left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Left padding: a decoder-only generate continues from the last column."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
