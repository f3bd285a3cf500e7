"""Read SFT chat data (one conversation per JSONL line) into `Conversation` objects.

Two record formats are understood, detected per record; one file must use one format:

NeMo (what NeMo-Aligner's SFT and SPIN read)::

    {"system": "...", "mask": "User", "conversations": [{"from": "User", "value": "..."},
     {"from": "Assistant", "value": "..."}]}

Hugging Face (what `tokenizer.apply_chat_template` takes)::

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
     {"role": "assistant", "content": "..."}]}

Reading is strict: the first bad record stops it with a `DataError` that names the file and
line, because a silently skipped record changes what SPIN trains on. Dropping bad records
instead is an explicit option (`skip_bad`) that logs the count.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spinlm.errors import DataError

ROLES = ("user", "assistant")
log = logging.getLogger(__name__)
NEMO, HF = "NeMo ('conversations')", "Hugging Face ('messages')"


@dataclass(frozen=True)
class Turn:
    """One message; `role` is one of `ROLES`."""

    role: str
    content: str


@dataclass(frozen=True)
class Conversation:
    """Alternating user/assistant turns, starting with user and ending with the assistant
    answer that SPIN learns to prefer over its own generation."""

    turns: tuple[Turn, ...]
    system: str | None = None
    source: str = ""  # "path:line", so later stages can name the record in their errors
    # the record's other top-level keys (e.g. the bundled task's "skill"), for evaluation reports
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


class _RecordError(Exception):
    """A problem with one record; `read_chat_jsonl` adds the path and line."""


def read_chat_jsonl(path: str | Path, skip_bad: bool = False) -> list[Conversation]:
    """All conversations of a chat JSONL file, in file order; blank lines are skipped.

    `skip_bad` (model.data.skip_bad_records) drops unusable records instead of stopping at the
    first one, and logs how many were dropped and why the first was; a file-level problem (not
    UTF-8 on a line, mixed formats, nothing usable left) is still an error.
    """
    path = Path(path)
    conversations: list[Conversation] = []
    skipped: list[str] = []
    seen: dict[bytes, int] = {}  # digest of the record text -> first line, to report repeats
    repeats: list[tuple[int, int]] = []
    file_format: tuple[str, int] | None = None  # (format, line it was first seen on)
    for lineno, raw in _read_lines(path):
        where = f"{path}:{lineno}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{where}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
        if not text.strip():
            continue
        try:
            record_format, conv = _parse_record(text, source=where)
        except _RecordError as err:
            if not skip_bad:
                raise DataError(f"{where}: {err} (model.data.skip_bad_records=true drops such records)") from None
            skipped.append(f"{where}: {err}")
            continue
        if file_format is None:
            file_format = (record_format, lineno)
        elif record_format != file_format[0]:
            raise DataError(
                f"{where}: record uses the {record_format} format but line {file_format[1]} "
                f"uses the {file_format[0]} format; a file must use one format throughout"
            )
        key = hashlib.blake2b(text.strip().encode("utf-8"), digest_size=16).digest()
        if key in seen:
            repeats.append((lineno, seen[key]))
        else:
            seen[key] = lineno
        conversations.append(conv)
    if skipped:
        log.warning("%s: skipped %d bad record(s) (model.data.skip_bad_records=true); first: %s",
                    path, len(skipped), skipped[0])
    if repeats:
        log.warning("%s: %d record(s) repeat an earlier one (line %d repeats line %d); they are trained on as often "
                    "as they appear", path, len(repeats), *repeats[0])
    if not conversations:
        if skipped:
            raise DataError(f"{path}:1: file has no usable records (all {len(skipped)} are bad; first: {skipped[0]})")
        raise DataError(f"{path}:1: file has no records (empty or only blank lines)")
    return conversations


def _read_lines(path: Path) -> list[tuple[int, bytes]]:
    """(1-based line number, raw bytes) pairs; bytes so that bad UTF-8 gets its line number."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}:0: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}:0: is a directory, expected a JSONL file") from None
    except OSError as err:
        raise DataError(f"{path}:0: cannot read file ({err.strerror})") from None
    return list(enumerate(data.splitlines(), start=1))


def _parse_record(text: str, source: str = "") -> tuple[str, Conversation]:
    """(format name, conversation) of one JSONL line; raises `_RecordError` on bad input."""
    try:
        record = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as err:
        raise _RecordError(f"not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise _RecordError(f"record is a JSON {type(record).__name__}, expected an object")
    has_nemo, has_hf = "conversations" in record, "messages" in record
    if has_nemo and has_hf:
        raise _RecordError("record has both 'conversations' and 'messages'; use one format")
    if has_nemo:
        system, turns = _parse_nemo(record)
        record_format = NEMO
    elif has_hf:
        system, turns = _parse_hf(record)
        record_format = HF
    else:
        raise _RecordError("record has neither 'conversations' (NeMo) nor 'messages' (Hugging Face)")
    _check_order(turns)
    extra = {k: v for k, v in record.items() if k not in ("conversations", "messages", "system")}
    return record_format, Conversation(turns=tuple(turns), system=system, source=source, extra=extra)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads hook: a key given twice in one object is an error (JSON would keep the last silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _RecordError(f"key {key!r} appears twice in one JSON object")
        out[key] = value
    return out


def _parse_nemo(record: dict[str, Any]) -> tuple[str | None, list[Turn]]:
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise _RecordError(f"'system' must be a string, got {type(system).__name__}")
    items = _as_list(record["conversations"], "conversations")
    turns = [_turn(item, i, "from", "value", "conversations") for i, item in enumerate(items)]
    return (system or None), turns


def _parse_hf(record: dict[str, Any]) -> tuple[str | None, list[Turn]]:
    items = _as_list(record["messages"], "messages")
    system = None
    if items and isinstance(items[0], dict) and items[0].get("role") == "system":
        content = items[0].get("content")
        if not isinstance(content, str):
            raise _RecordError(f"messages[0]: system content must be a string, got {type(content).__name__}")
        system, items = (content or None), items[1:]
        offset = 1
    else:
        offset = 0
    turns = [_turn(item, i + offset, "role", "content", "messages") for i, item in enumerate(items)]
    return system, turns


def _as_list(value: Any, key: str) -> list[Any]:
    if not isinstance(value, list):
        raise _RecordError(f"'{key}' must be a list, got {type(value).__name__}")
    return value


def _turn(item: Any, i: int, role_key: str, content_key: str, list_key: str) -> Turn:
    """One validated turn; `i` is its index in the record's list, for the message."""
    where = f"{list_key}[{i}]"
    if not isinstance(item, dict):
        raise _RecordError(f"{where}: turn is a JSON {type(item).__name__}, expected an object")
    missing = [k for k in (role_key, content_key) if k not in item]
    if missing:
        raise _RecordError(f"{where}: turn is missing key(s) {', '.join(repr(k) for k in missing)}")
    role, content = item[role_key], item[content_key]
    if not isinstance(role, str) or role.lower() not in ROLES:
        hint = " (a system message may only come first)" if role == "system" else ""
        raise _RecordError(f"{where}: unknown role {role!r}, expected one of {ROLES}{hint}")
    if not isinstance(content, str):
        raise _RecordError(f"{where}: content must be a string, got {type(content).__name__}")
    if not content.strip():
        raise _RecordError(f"{where}: empty content")
    return Turn(role=role.lower(), content=content)


def _check_order(turns: list[Turn]) -> None:
    """Turns must alternate user/assistant from a user turn and end with an assistant answer."""
    if not turns:
        raise _RecordError("conversation has no turns")
    for i, turn in enumerate(turns):
        expected = ROLES[i % 2]
        if turn.role != expected:
            raise _RecordError(
                f"turn {i} is {turn.role!r} but {expected!r} was expected: "
                "turns must alternate user/assistant, starting with user"
            )
    if turns[-1].role != "assistant":
        raise _RecordError("no final assistant turn: the last turn must be the assistant's answer")
