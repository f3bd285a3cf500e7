"""Render and tokenize many conversations: batched, in worker processes, cached on disk.

`tokenize_conversations` gives, for every conversation, exactly the ids of `ChatRenderer.render`
(the tests hold it to that on chat-template and NeMo renderers), but at scale:

- batched: chunks of `CHUNK` conversations, one tokenizer call for their prompts and one for their
  answers (`ChatRenderer.render_batch`; a fast tokenizer encodes a batch in Rust);
- in parallel: with `workers` > 1 the chunks go to forked worker processes, which pays because
  the chat template is rendered in Python (one process per CPU core by default for sets of
  `PARALLEL_MIN` conversations or more; `model.data.tokenizer_workers` sets the number);
- cached: sets of `CACHE_MIN` conversations or more are stored in `cache_dir`
  (`$SPINLM_CACHE/tokens`, by default `~/.cache/spinlm/tokens`) as `<key>.safetensors`, the key a
  digest of the conversations' content, the renderer's fingerprint (the tokenizer's full
  serialisation, chat template, special tokens, NeMo prompt tokens, the rendering code and the
  transformers/tokenizers versions) and this file's format. A safetensors file holds arrays and a
  JSON header only: loading it runs no code. A file that fails its checks is ignored (and rewritten).

The result is flat: one int32 array of all prompt ids and one of offsets, likewise for answers;
4 bytes a token instead of a Python int's ~36, which decides whether 200k conversations fit in memory.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from spinlm.data.chat import Conversation, Turn

log = logging.getLogger(__name__)

CHUNK = 512  # conversations per tokenizer call / per task of a worker process
PARALLEL_MIN = 4096  # fewer conversations than this tokenize in this process (a fork costs more than it saves)
CACHE_MIN = 1000  # fewer conversations than this are not cached (they tokenize in about a second)
FORMAT = "spinlm-tokens-1"  # changes whenever the cached arrays change meaning
PARTS = ("prompt", "answer", "generated")

_WORK: tuple[Any, Sequence[Conversation], bool] | None = None  # what forked workers inherit


@dataclass
class TokenizedSet:
    """Token ids of n conversations: conversation i's prompt is `ids["prompt"][offsets["prompt"][i]:
    offsets["prompt"][i + 1]]`; likewise its answer, and its generated answer when tokenized."""

    ids: dict[str, np.ndarray]  # part -> int32 ids, all conversations end to end
    offsets: dict[str, np.ndarray]  # part -> int64 (n + 1,)

    def __len__(self) -> int:
        return len(self.offsets["prompt"]) - 1

    def get(self, part: str, i: int) -> np.ndarray | None:
        """Conversation i's ids of `part` (a view), or None when that part was not tokenized."""
        if part not in self.ids:
            return None
        return self.ids[part][self.offsets[part][i]:self.offsets[part][i + 1]]


def default_workers(num_conversations: int, processes_per_node: int = 1) -> int:
    """Worker processes for a set: this node's CPU cores shared by its ranks, for large sets only."""
    if num_conversations < PARALLEL_MIN or not _can_fork():
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, processes_per_node))


def tokenize_conversations(
    conversations: Sequence[Conversation], renderer: Any, workers: int = 1, cache_dir: str | Path | None = None,
    with_generated: bool = False, label: str = "", show_progress: bool = True,
) -> TokenizedSet:
    """Every conversation's (prompt, answer) ids as `renderer.render` gives them, and with
    `with_generated` the ids of its `generated` answer (rendered as the conversation's answer)."""
    t0 = time.perf_counter()
    path = _cache_path(conversations, renderer, cache_dir, with_generated)
    if path is not None and path.is_file():
        cached = _load(path, len(conversations), with_generated)
        if cached is not None:
            log.info("%s: token ids of %d conversations read from the cache %s (%.1fs)", label, len(cached),
                     path, time.perf_counter() - t0)
            return cached
    workers = max(1, min(workers, -(-len(conversations) // CHUNK))) if _can_fork() else 1
    result = _tokenize(conversations, renderer, workers, with_generated, label, show_progress)
    seconds = time.perf_counter() - t0
    log.info("%s: tokenized %d conversations in %.1fs (%d process%s, %.0f conversations/s)%s", label,
             len(conversations), seconds, workers, "es" if workers > 1 else "", len(conversations) / max(seconds, 1e-9),
             f"; cached in {path}" if path is not None and _save(path, result) else "")
    return result


def _tokenize(conversations: Sequence[Conversation], renderer: Any, workers: int, with_generated: bool,
              label: str, show_progress: bool) -> TokenizedSet:
    global _WORK
    bounds = [(s, min(s + CHUNK, len(conversations))) for s in range(0, len(conversations), CHUNK)]
    bar = tqdm(total=len(conversations), desc=f"Tokenizing {label}".strip(), unit="conv", dynamic_ncols=True,
               disable=not show_progress or len(bounds) < 2)
    _WORK = (renderer, conversations, with_generated)
    try:
        if workers > 1:
            # fork: workers inherit the renderer and the conversations instead of receiving them pickled
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
                chunks = [_counted(bar, chunk) for chunk in pool.map(_tokenize_chunk, bounds)]
        else:
            chunks = [_counted(bar, _tokenize_chunk(b)) for b in bounds]
    finally:
        _WORK = None
        bar.close()
    return _concatenate(chunks, with_generated)


def _counted(bar: tqdm, chunk: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    bar.update(len(chunk["prompt"][1]))
    return chunk


def _tokenize_chunk(bounds: tuple[int, int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """part -> (flat int32 ids, int64 lengths) of conversations[start:end] (runs in a worker or here)."""
    renderer, conversations, with_generated = _WORK
    convs = conversations[bounds[0]:bounds[1]]
    prompts, answers = renderer.render_batch(convs)
    out = {"prompt": _flat(prompts), "answer": _flat(answers)}
    if with_generated:
        texts = [renderer.render_text(_with_generated_answer(c))[1] for c in convs]
        out["generated"] = _flat(renderer.encode_batch(texts))
    return out


def _with_generated_answer(conv: Conversation) -> Conversation:
    """The conversation with its final answer replaced by its `generated` one (the opponent's)."""
    return replace(conv, turns=conv.turns[:-1] + (Turn("assistant", conv.generated or ""),))


def _flat(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    ids = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=int(lengths.sum()))
    return ids, lengths


def _concatenate(chunks: list[dict[str, tuple[np.ndarray, np.ndarray]]], with_generated: bool) -> TokenizedSet:
    ids, offsets = {}, {}
    for part in PARTS if with_generated else PARTS[:2]:
        ids[part] = np.concatenate([c[part][0] for c in chunks]) if chunks else np.zeros(0, np.int32)
        lengths = np.concatenate([c[part][1] for c in chunks]) if chunks else np.zeros(0, np.int64)
        offsets[part] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TokenizedSet(ids, offsets)


def _can_fork() -> bool:
    return "fork" in multiprocessing.get_all_start_methods()


# ----- the cache ------------------------------------------------------------------------------
def _cache_path(conversations: Sequence[Conversation], renderer: Any, cache_dir: str | Path | None,
                with_generated: bool) -> Path | None:
    """Where this set's token ids are cached, or None (no cache dir, a small set, an unkeyable tokenizer)."""
    if cache_dir is None or len(conversations) < CACHE_MIN:
        return None
    fingerprint = renderer.fingerprint()
    if fingerprint is None:
        return None
    digest = hashlib.blake2b(f"{FORMAT} {fingerprint} {with_generated}".encode("utf-8"), digest_size=20)
    for conv in conversations:
        fields = [conv.system, conv.generated, *(f for turn in conv.turns for f in (turn.role, turn.content))]
        digest.update("".join(map(_field, fields)).encode("utf-8"))
    return Path(cache_dir).expanduser() / f"{digest.hexdigest()}.safetensors"


def _field(text: str | None) -> str:
    """Length-prefixed, so that ('ab', 'c') and ('a', 'bc') differ, and None differs from ''."""
    return "-;" if text is None else f"{len(text)}:{text}"


def _load(path: Path, n: int, with_generated: bool) -> TokenizedSet | None:
    """The cached set, or None (with a warning) when the file is unreadable or inconsistent."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        arrays = load_file(str(path))
        parts = PARTS if with_generated else PARTS[:2]
        result = TokenizedSet({p: arrays[f"{p}_ids"] for p in parts}, {p: arrays[f"{p}_offsets"] for p in parts})
        for p in parts:
            offsets = result.offsets[p]
            ok = (len(offsets) == n + 1 and offsets[0] == 0 and offsets[-1] == len(result.ids[p])
                  and bool(np.all(np.diff(offsets) >= 0)) and result.ids[p].dtype == np.int32)
            if not ok:
                raise ValueError(f"{p} offsets do not match {n} conversations")
        return result
    except (OSError, KeyError, ValueError, SafetensorError) as err:
        log.warning("%s: unusable token cache (%s); tokenizing again", path, err)
        return None


def _save(path: Path, result: TokenizedSet) -> bool:
    """Write atomically (a crash never leaves half a file under the final name); False if it cannot."""
    from safetensors.numpy import save

    arrays = {**{f"{p}_ids": a for p, a in result.ids.items()}, **{f"{p}_offsets": a for p, a in result.offsets.items()}}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = save(arrays, metadata={"format": FORMAT, "conversations": str(len(result))})
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as err:
        log.warning("cannot write the token cache %s (%s); continuing without it", path, err)
        return False
    return True
