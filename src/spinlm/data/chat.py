"""Chat records -> `Conversation` objects: the record formats, and the strict JSONL reader.

Three record formats are understood, detected per record (`parse_record`); one file must use one
format. The same function reads a JSONL line, a JSON array item and a `datasets` row
(`spinlm.data.sources` picks the reader):

NeMo (what NeMo-Aligner's SFT and SPIN read)::

    {"system": "...", "mask": "User", "conversations": [{"from": "User", "value": "..."},
     {"from": "Assistant", "value": "..."}]}

Hugging Face (what `tokenizer.apply_chat_template` takes; UltraChat's `messages`)::

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
     {"role": "assistant", "content": "..."}]}

SPIN paper (`UCLA-AGI/SPIN_iter0`): `real` is the ground-truth conversation, `generated` the same
turns ending with the SFT model's own answer, which may serve as iteration 0's opponent answer::

    {"real": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}],
     "generated": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

Reading is strict: the first bad record stops it with a `DataError` that names the file and
line, because a silently skipped record changes what SPIN trains on. Dropping bad records
instead is an explicit option (`skip_bad`) that logs the count.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spinlm.errors import DataError

ROLES = ("user", "assistant")
log = logging.getLogger(__name__)
NEMO, HF = "NeMo ('conversations')", "Hugging Face ('messages')"
PAPER_COLUMN, GENERATED_COLUMN = "real", "generated"
FORMATS = {"conversations": NEMO, "messages": HF, PAPER_COLUMN: "SPIN paper ('real'/'generated')"}
SKIP_HINT = "model.data.skip_bad_records=true drops such records"


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
    source: str = ""  # "path:line" or "source: row N", so later stages can name the record in their errors
    # the record's other top-level keys (e.g. the bundled task's "skill"), for evaluation reports
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    generated: str | None = None  # the SPIN paper's `generated` final answer (an opponent answer), if given


class RecordError(Exception):
    """A problem with one record; the reader adds where it is (file:line, or row and `column`)."""

    def __init__(self, message: str, column: str | None = None):
        super().__init__(message)
        self.column = column


def read_chat_jsonl(path: str | Path, skip_bad: bool = False, column: str | None = None) -> list[Conversation]:
    """All conversations of a chat JSONL file, in file order; blank lines are skipped.

    `skip_bad` (model.data.skip_bad_records) drops unusable records instead of stopping at the
    first one, and logs how many were dropped and why the first was; a file-level problem (not
    UTF-8 on a line, mixed formats, nothing usable left) is still an error. `column`: see `parse_record`.
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
            record_format, conv = _parse_record(text, source=where, column=column)
        except RecordError as err:
            if not skip_bad:
                raise DataError(f"{where}: {err} ({SKIP_HINT})") from None
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
    if repeats:
        log.warning("%s: %d record(s) repeat an earlier one (line %d repeats line %d); they are trained on as often "
                    "as they appear", path, len(repeats), *repeats[0])
    return check_read(conversations, skipped, str(path), f"{path}:1: file has no")


def check_read(conversations: list[Conversation], skipped: list[str], name: str, empty: str) -> list[Conversation]:
    """Log the records skip_bad dropped; a source left with no conversation is a `DataError` that
    starts with `empty` (e.g. 'train.jsonl:1: file has no')."""
    if skipped:
        log.warning("%s: skipped %d bad record(s) (model.data.skip_bad_records=true); first: %s",
                    name, len(skipped), skipped[0])
    if not conversations:
        if skipped:
            raise DataError(f"{empty} usable records (all {len(skipped)} are bad; first: {skipped[0]})")
        raise DataError(f"{empty} records (empty or only blank lines)")
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


def _parse_record(text: str, source: str = "", column: str | None = None) -> tuple[str, Conversation]:
    """(format name, conversation) of one JSONL line; raises `RecordError` on bad input."""
    try:
        record = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as err:
        raise RecordError(f"not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise RecordError(f"record is a JSON {type(record).__name__}, expected an object")
    return parse_record(record, source, column)


def parse_record(record: Mapping[str, Any], source: str = "", column: str | None = None) -> tuple[str, Conversation]:
    """(format name, conversation) of one decoded record (a JSON object or a dataset row).

    `column` names the key holding the turns (`model.data.*.conversation_column`); None detects
    'conversations' (NeMo), 'messages' (Hugging Face) or 'real' (SPIN paper). Raises `RecordError`."""
    column = column or detect_column(record)
    if column not in record:
        raise RecordError(f"record has no {column!r} key (the conversation column)", column)
    items = _as_list(record[column], column)
    if _nemo_style(column, items):
        system, turns = _parse_nemo(record, items, column)
    else:
        system, turns = _parse_hf(items, column)
    _check_order(turns, column)
    generated = _parse_generated(record, system, turns) if column == PAPER_COLUMN else None
    extra = {k: v for k, v in record.items() if k not in (column, "system", GENERATED_COLUMN)}
    conv = Conversation(turns=tuple(turns), system=system, source=source, extra=extra, generated=generated)
    return FORMATS.get(column, f"{column!r}"), conv


def detect_column(record: Mapping[str, Any]) -> str:
    """The record's conversation key among `FORMATS`; exactly one must be present."""
    present = [c for c in FORMATS if c in record]
    if len(present) > 1:
        if set(present) == {"conversations", "messages"}:
            raise RecordError("record has both 'conversations' and 'messages'; use one format")
        raise RecordError(f"record has several conversation keys ({', '.join(present)}); use one format or "
                          "set model.data.*.conversation_column")
    if not present:
        raise RecordError("record has neither 'conversations' (NeMo) nor 'messages' (Hugging Face) "
                          "nor 'real' (SPIN paper)")
    return present[0]


def _nemo_style(column: str, items: list[Any]) -> bool:
    """NeMo turns ({'from', 'value'}) rather than Hugging Face messages ({'role', 'content'})."""
    if column in FORMATS:
        return column == "conversations"
    return bool(items) and isinstance(items[0], dict) and "from" in items[0]


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads hook: a key given twice in one object is an error (JSON would keep the last silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise RecordError(f"key {key!r} appears twice in one JSON object")
        out[key] = value
    return out


def _parse_nemo(record: Mapping[str, Any], items: list[Any], column: str) -> tuple[str | None, list[Turn]]:
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise RecordError(f"'system' must be a string, got {type(system).__name__}", "system")
    turns = [_turn(item, i, "from", "value", column) for i, item in enumerate(items)]
    return (system or None), turns


def _parse_hf(items: list[Any], column: str) -> tuple[str | None, list[Turn]]:
    system = None
    offset = 0
    if items and isinstance(items[0], dict) and items[0].get("role") == "system":
        content = items[0].get("content")
        if not isinstance(content, str):
            raise RecordError(f"{column}[0]: system content must be a string, got {type(content).__name__}", column)
        system, items, offset = (content or None), items[1:], 1
    turns = [_turn(item, i + offset, "role", "content", column) for i, item in enumerate(items)]
    return system, turns


def _parse_generated(record: Mapping[str, Any], system: str | None, turns: list[Turn]) -> str | None:
    """The SPIN paper's `generated` column: the same conversation with the opponent's final answer
    (the text of that answer, possibly empty), or None when the record has none."""
    items = record.get(GENERATED_COLUMN)
    if items is None:
        return None
    col = GENERATED_COLUMN
    items = _as_list(items, col)
    if not items or not isinstance(items[-1], dict) or items[-1].get("role") != "assistant":
        raise RecordError(f"'{col}' must end with the assistant's generated answer", col)
    answer = items[-1].get("content")
    if not isinstance(answer, str):
        raise RecordError(f"{col}[{len(items) - 1}]: content must be a string, got {type(answer).__name__}", col)
    gen_system, gen_turns = _parse_hf(items[:-1], col)
    if gen_system != system or gen_turns != turns[:-1]:
        raise RecordError(f"'{col}' must repeat the turns of '{PAPER_COLUMN}' before its final answer", col)
    return answer


def _as_list(value: Any, key: str) -> list[Any]:
    """The turns as a list; tuples and numpy arrays (pandas rows) count as lists."""
    if isinstance(value, tuple) or type(value).__name__ == "ndarray":
        value = list(value)
    if not isinstance(value, list):
        raise RecordError(f"'{key}' must be a list, got {type(value).__name__}", key)
    return value


def _turn(item: Any, i: int, role_key: str, content_key: str, list_key: str) -> Turn:
    """One validated turn; `i` is its index in the record's list, for the message."""
    where = f"{list_key}[{i}]"
    if not isinstance(item, dict):
        raise RecordError(f"{where}: turn is a JSON {type(item).__name__}, expected an object", list_key)
    missing = [k for k in (role_key, content_key) if k not in item]
    if missing:
        raise RecordError(f"{where}: turn is missing key(s) {', '.join(repr(k) for k in missing)}", list_key)
    role, content = item[role_key], item[content_key]
    if not isinstance(role, str) or role.lower() not in ROLES:
        hint = " (a system message may only come first)" if role == "system" else ""
        raise RecordError(f"{where}: unknown role {role!r}, expected one of {ROLES}{hint}", list_key)
    if not isinstance(content, str):
        raise RecordError(f"{where}: content must be a string, got {type(content).__name__}", list_key)
    if not content.strip():
        raise RecordError(f"{where}: empty content", list_key)
    return Turn(role=role.lower(), content=content)


def _check_order(turns: list[Turn], column: str) -> None:
    """Turns must alternate user/assistant from a user turn and end with an assistant answer."""
    if not turns:
        raise RecordError("conversation has no turns", column)
    for i, turn in enumerate(turns):
        expected = ROLES[i % 2]
        if turn.role != expected:
            raise RecordError(
                f"turn {i} is {turn.role!r} but {expected!r} was expected: "
                "turns must alternate user/assistant, starting with user", column
            )
    if turns[-1].role != "assistant":
        raise RecordError("no final assistant turn: the last turn must be the assistant's answer", column)
