"""Turn a `Conversation` into (prompt_ids, answer_ids) for SPIN.

The prompt is everything before the final assistant answer, ending with the assistant
header, i.e. exactly what the opponent model is asked to continue at generation time.
The answer is the final assistant content plus its end-of-turn marker and nothing after it,
so a ground-truth answer and a generated one (which stops at that marker) look alike.

Prompt and answer are tokenized separately with `add_special_tokens=False`: the prompt ids
used for generation are then byte-identical to the ones trained on, and chat templates
already carry their own BOS token.

Two modes:
- default: the tokenizer's own chat template (`apply_chat_template`);
- NeMo: `chat_prompt_tokens` (as in NeMo-Aligner's config), rendering
  `<extra_id_0>System\\n{system}\\n<extra_id_1>User\\n{u}\\n<extra_id_1>Assistant\\n{a}\\n<extra_id_1>`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from spinlm.data.chat import Conversation, Turn
from spinlm.errors import ConfigError, DataError

# End-of-turn markers of common chat templates, tried after the tokenizer's own eos token.
KNOWN_END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>", "<end_of_turn>")
NEMO_PROMPT_KEYS = ("system_turn_start", "turn_start", "label_start", "end_of_turn", "end_of_name")
_PROBE = Conversation(turns=(Turn("user", "Hi"), Turn("assistant", "Hello")))


def conversation_to_messages(conv: Conversation) -> list[dict[str, str]]:
    """Hugging Face chat messages (system first, when set) for `apply_chat_template`."""
    messages = [{"role": "system", "content": conv.system}] if conv.system else []
    return messages + [{"role": t.role, "content": t.content} for t in conv.turns]


def _dedup(items: list[str | None]) -> list[str]:
    """Non-empty items in first-seen order."""
    return list(dict.fromkeys(s for s in items if s))


def end_markers(eos_token: str | None) -> list[str]:
    """Candidate end-of-turn markers in priority order; the one source of truth for them."""
    return _dedup([eos_token, *KNOWN_END_MARKERS])


def find_end_marker(answer_text: str, content: str, markers: list[str]) -> tuple[str, int] | None:
    """(marker, index just past it) of the first marker after `content`, or None."""
    start = answer_text.find(content)
    start = start + len(content) if start >= 0 else 0
    found = [(answer_text.find(m, start), m) for m in markers]
    found = [(pos, m) for pos, m in found if pos >= 0]
    if not found:
        return None
    pos, marker = min(found, key=lambda f: f[0])  # ties keep priority order: min is stable
    return marker, pos + len(marker)


class ChatRenderer:
    """Renders conversations to token ids with a chat template or NeMo `chat_prompt_tokens`.

    In NeMo mode `label_start` is accepted (NeMo's config always has it) but unused: NeMo's
    SPIN prompts do not contain it either.
    """

    def __init__(self, tokenizer: Any, chat_prompt_tokens: Mapping[str, str] | None = None):
        self.tokenizer = tokenizer
        self.chat_prompt_tokens = _check_prompt_tokens(chat_prompt_tokens)
        self._fingerprint: str | None = None
        self._end_strings = self._detect_end_strings()

    @property
    def end_strings(self) -> list[str]:
        """Strings that end an assistant answer: the stop strings for generation."""
        return list(self._end_strings)

    def render_text(self, conv: Conversation) -> tuple[str, str]:
        """(prompt_text, answer_text); the answer ends with its end-of-turn marker."""
        if self.chat_prompt_tokens is not None:
            return _nemo_texts(conv, self.chat_prompt_tokens)
        return self._template_texts(conv)

    def render(self, conv: Conversation) -> tuple[list[int], list[int]]:
        """(prompt_ids, answer_ids), tokenized separately so prompts match generation prompts."""
        prompt_text, answer_text = self.render_text(conv)
        return self._encode(prompt_text), self._encode(answer_text)

    def earlier_answer_mask(self, conv: Conversation) -> list[bool]:
        """Per token of the rendered prompt: True inside an earlier assistant answer (through its end
        marker), for SFT's loss on every assistant turn (`model.sft.loss_turns=all`).

        The spans come from rendering the conversation cut after each earlier answer; token
        character offsets (a fast tokenizer) map them onto the prompt's own ids."""
        prompt_text, _ = self.render_text(conv)
        where = f"{conv.source}: " if conv.source else ""
        spans = []
        for j, turn in enumerate(conv.turns[:-1]):
            if turn.role != "assistant":
                continue
            head, answer = self.render_text(Conversation(turns=conv.turns[:j + 1], system=conv.system))
            if not prompt_text.startswith(head + answer):
                raise DataError(f"{where}the chat template renders an earlier answer differently inside the whole "
                                "conversation; model.sft.loss_turns=all cannot find its tokens (use final)")
            spans.append((len(head), len(head) + len(answer)))
        if not getattr(self.tokenizer, "is_fast", False):
            raise ConfigError("config: model.sft.loss_turns=all needs a fast (Rust) tokenizer for token offsets")
        enc = self.tokenizer(prompt_text, add_special_tokens=False, return_offsets_mapping=True)
        return [any(a <= start < b for a, b in spans) for start, _ in enc["offset_mapping"]]
    def render_batch(self, convs: Sequence[Conversation]) -> tuple[list[list[int]], list[list[int]]]:
        """(prompt ids, answer ids) of many conversations: the same ids as `render`, with one batched
        tokenizer call for the prompts and one for the answers (a fast tokenizer runs them in Rust)."""
        texts = [self.render_text(conv) for conv in convs]
        return self.encode_batch([p for p, _ in texts]), self.encode_batch([a for _, a in texts])

    def fingerprint(self) -> str | None:
        """A digest of everything that decides the token ids `render` gives: the tokenizer (its full
        serialisation, template and special tokens), the NeMo prompt tokens and this module's code.
        None for a tokenizer without a serialisable fast backend: nothing can be cached for it."""
        if self._fingerprint is not None:
            return self._fingerprint
        import tokenizers
        import transformers

        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        template = self.tokenizer.chat_template or ""
        parts = [
            type(self.tokenizer).__name__, backend.to_str(), json.dumps(template, sort_keys=True),
            json.dumps(self.tokenizer.special_tokens_map, sort_keys=True, default=str),
            json.dumps(self.chat_prompt_tokens, sort_keys=True), Path(__file__).read_text(encoding="utf-8"),
            transformers.__version__, tokenizers.__version__,  # apply_chat_template and the encoder themselves
            # templates that print today's date render differently tomorrow
            time.strftime("%Y-%m-%d") if "strftime_now" in template else "",
        ]
        digest = hashlib.blake2b(digest_size=16)
        for part in parts:
            data = part.encode("utf-8")
            digest.update(len(data).to_bytes(8, "little") + data)
        self._fingerprint = digest.hexdigest()  # the tokenizer is not changed during a run
        return self._fingerprint

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, as `render` tokenizes (no special tokens added)."""
        if not texts:
            return []
        return list(self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"])

    def _template_texts(self, conv: Conversation) -> tuple[str, str]:
        messages = conversation_to_messages(conv)
        where = f"{conv.source}: " if conv.source else ""
        try:
            prompt_text = self.tokenizer.apply_chat_template(
                messages[:-1], tokenize=False, add_generation_prompt=True
            )
            full_text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as err:  # templates raise anything (jinja TemplateError, ValueError, ...)
            raise DataError(f"{where}the tokenizer's chat template failed: {err}") from err
        if not full_text.startswith(prompt_text):
            raise DataError(
                f"{where}the chat template renders the conversation so that it does not start "
                "with its own generation prompt; this template cannot split prompt and answer "
                "(pass chat_prompt_tokens to render NeMo-style instead)"
            )
        answer_text = full_text[len(prompt_text):]
        end = find_end_marker(answer_text, conv.turns[-1].content, end_markers(self.tokenizer.eos_token))
        if end is not None:
            return prompt_text, answer_text[: end[1]]
        if not self.tokenizer.eos_token:
            raise DataError(f"{where}answer has no end-of-turn marker and the tokenizer has no eos_token")
        return prompt_text, answer_text + self.tokenizer.eos_token

    def _detect_end_strings(self) -> list[str]:
        eos = self.tokenizer.eos_token
        if self.chat_prompt_tokens is not None:
            return _dedup([self.chat_prompt_tokens["turn_start"], eos])
        _, answer_text = self._template_texts(_PROBE)
        end = find_end_marker(answer_text, _PROBE.turns[-1].content, end_markers(eos))
        return _dedup([end[0] if end else None, eos])


def _check_prompt_tokens(tokens: Mapping[str, str] | None) -> dict[str, str] | None:
    """A plain dict copy of NeMo chat_prompt_tokens, or ConfigError naming what is wrong."""
    if tokens is None:
        return None
    missing = [k for k in NEMO_PROMPT_KEYS if k not in tokens]
    if missing:
        raise ConfigError(f"config: model.data.chat_prompt_tokens is missing key(s): {', '.join(missing)}")
    bad = [k for k in NEMO_PROMPT_KEYS if not isinstance(tokens[k], str)]
    if bad:
        raise ConfigError(f"config: model.data.chat_prompt_tokens values must be strings: {', '.join(bad)}")
    if not tokens["turn_start"]:
        raise ConfigError("config: model.data.chat_prompt_tokens.turn_start must not be empty: it ends every answer")
    return {k: tokens[k] for k in NEMO_PROMPT_KEYS}


def _nemo_texts(conv: Conversation, t: Mapping[str, str]) -> tuple[str, str]:
    """NeMo's SFT/SPIN rendering; the answer ends with the next turn_start, as NeMo's does."""
    eon, eot, ts = t["end_of_name"], t["end_of_turn"], t["turn_start"]
    names = {"user": "User", "assistant": "Assistant"}
    parts = [f"{t['system_turn_start']}System{eon}{conv.system or ''}{eot}"]
    parts += [f"{ts}{names[turn.role]}{eon}{turn.content}{eot}" for turn in conv.turns[:-1]]
    prompt_text = "".join(parts) + f"{ts}Assistant{eon}"
    return prompt_text, f"{conv.turns[-1].content}{eot}{ts}"
