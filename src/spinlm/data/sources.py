"""Where conversations come from: one reader per kind of source, chosen by `read_conversations`.

`model.data.{train,validation,test}_ds.file_path` names one of:

- a JSONL file (any suffix but those below): `chat.read_chat_jsonl`, strict; errors name file:line;
- a `.json` file: a JSON array of records (errors name the row), or JSON lines as above;
- through the `datasets` library (`pip install 'spinlm[data]'`): a `.parquet` or `.arrow` file, a
  directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`, or a Hugging Face hub
  dataset id (`owner/name`; offline, HF_HUB_OFFLINE=1, it comes from the local datasets cache).
  `split` picks a split of a DatasetDict or hub dataset; errors name the source, the row index
  (0-based) and the column.

The Python API (`spinlm.api.spin`) may also hand over, in memory, a `datasets.Dataset` or
`DatasetDict`, or a list of conversations (records as above, message lists, or `Conversation`s).
Every record goes through `chat.parse_record`, so all sources accept the same formats and the
column named by `conversation_column` (default: detect messages, conversations or real).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from spinlm.data.chat import (
    FORMATS, SKIP_HINT, Conversation, RecordError, check_read, detect_column, parse_record, read_chat_jsonl,
)
from spinlm.errors import DataError

DATASETS_SUFFIXES = (".parquet", ".arrow")  # files read through `datasets`
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_FILE_SUFFIXES = (".jsonl", ".json", *DATASETS_SUFFIXES)
EMPTY = "no rows (an empty split or file)"
_LIST_COLUMN = "turns"  # a bare list of messages/turns in memory is read as this column


@dataclass(frozen=True)
class DataSource:
    """One set of conversations: `location` is a path or hub id (file_path), or an in-memory object."""

    location: Any
    split: str | None = None  # a split of a DatasetDict / hub dataset
    column: str | None = None  # the conversation column; None = detect
    key: str = ""  # the config section that named it, e.g. "model.data.train_ds", for messages

    @classmethod
    def from_config(cls, ds_cfg: Any, key: str, location: Any = None) -> DataSource:
        """The source a `model.data.*_ds` section names; `location` replaces its file_path (in-memory data)."""
        return cls(ds_cfg.file_path if location is None else location, ds_cfg.get("split"),
                   ds_cfg.get("conversation_column"), key)

    @property
    def kind(self) -> str:
        """jsonl, json, parquet, arrow, disk (save_to_disk), hub, dataset (in memory) or list (in memory)."""
        return source_kind(self)

    @property
    def section(self) -> str:
        """The config section to name in a hint (which key to set)."""
        return self.key or "model.data.*_ds"

    @property
    def label(self) -> str:
        """How messages name the source: the path, 'owner/name (split s)', or the in-memory object."""
        if isinstance(self.location, (str, Path)):
            return f"{self.location} (split {self.split})" if self.split else str(self.location)
        what = "list" if isinstance(self.location, (list, tuple)) else type(self.location).__name__
        return f"{self.key or 'data'} (in-memory {what})"


def source_kind(source: DataSource) -> str:
    """The reader a source needs, from its type or a stat of the path (cheap: reads no data).

    A path that is not there is a hub id when it looks like one (`owner/name`, no file suffix);
    otherwise it is a `DataError` naming the path and the config key."""
    loc = source.location
    if not isinstance(loc, (str, Path)):
        if isinstance(loc, (list, tuple)):
            return "list"
        if type(loc).__name__ in ("Dataset", "DatasetDict"):
            return "dataset"
        raise DataError(f"{source.label}: expected a datasets.Dataset, a DatasetDict or a list of conversations, "
                        f"got {type(loc).__name__}")
    path = Path(loc).expanduser()
    key = f" ({source.key}.file_path)" if source.key else ""
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return "disk"
        raise DataError(f"{path}:0: is a directory, but not one written by Dataset.save_to_disk or "
                        f"DatasetDict.save_to_disk; expected a JSONL, JSON, parquet or arrow file{key}")
    if path.is_file():
        suffix = path.suffix.lower()
        return suffix.lstrip(".") if suffix in (".json", *DATASETS_SUFFIXES) else "jsonl"
    if _HUB_ID.fullmatch(str(loc)) and not str(loc).lower().endswith(_FILE_SUFFIXES):
        return "hub"
    raise DataError(f"{path}:0: file not found{key}")


def check_source(source: DataSource) -> None:
    """What can be checked before reading: the kind of source, and `datasets` installed if it needs it."""
    if source.kind in ("parquet", "arrow", "disk", "hub"):
        _import_datasets(source)


def read_conversations(source: DataSource | str | Path, skip_bad: bool = False) -> list[Conversation]:
    """Every conversation of a source, in order. `skip_bad` (model.data.skip_bad_records) drops bad
    records, counted; otherwise the first one is a one-line `DataError` naming where it is."""
    if not isinstance(source, DataSource):
        source = DataSource(source)
    kind = source.kind
    if kind in ("jsonl", "json", "list"):
        _refuse_split(source)
    if kind == "jsonl":
        return read_chat_jsonl(source.location, skip_bad, source.column)
    if kind == "json":
        return _read_json(source, skip_bad)
    if kind == "list":
        return _read_list(source, skip_bad)
    return _read_dataset(_load_dataset(source), source, skip_bad)


# ----- JSON arrays and in-memory lists -------------------------------------------------------
def _read_json(source: DataSource, skip_bad: bool) -> list[Conversation]:
    """A JSON array of records; a file that does not start with '[' is JSON lines."""
    path = Path(source.location).expanduser()
    raw = path.read_bytes()
    if not raw.lstrip().startswith(b"["):
        return read_chat_jsonl(path, skip_bad, source.column)
    try:
        records = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}:0: not valid UTF-8 ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}:1: a JSON file must hold an array of records, or one record per line")
    column = source.column or _first_column(records)
    return _parse_rows(enumerate(records), source, column, skip_bad)


def _read_list(source: DataSource, skip_bad: bool) -> list[Conversation]:
    """In-memory conversations: records (dicts), bare lists of messages/turns, or `Conversation`s."""
    items = list(source.location)
    if items and all(isinstance(it, Conversation) for it in items):
        label = source.label
        return [c if c.source else replace(c, source=f"{label}: row {i}") for i, c in enumerate(items)]
    if items and all(isinstance(it, list) for it in items):
        return _parse_rows(((i, {_LIST_COLUMN: it}) for i, it in enumerate(items)), source, _LIST_COLUMN, skip_bad)
    return _parse_rows(enumerate(items), source, source.column or _first_column(items), skip_bad)


def _first_column(records: list[Any]) -> str | None:
    """The conversation column of the first record: every record must then use it (one format)."""
    first = records[0] if records else None
    try:
        return detect_column(first) if isinstance(first, Mapping) else None
    except RecordError:
        return None  # the first row's own error is reported, with its row index


# ----- the datasets library ------------------------------------------------------------------
def _import_datasets(source: DataSource):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{source.label}: reading a {source.kind} source needs the `datasets` package: "
                        "pip install 'spinlm[data]'") from None
    return datasets


def _load_dataset(source: DataSource) -> Any:
    """The `datasets.Dataset` of a parquet/arrow file, a save_to_disk directory, a hub id or an in-memory object."""
    kind, loc = source.kind, source.location
    if kind == "dataset":
        return _pick_split(loc, source)
    datasets = _import_datasets(source)
    try:
        if kind in ("parquet", "arrow"):
            _refuse_split(source)
            return datasets.load_dataset(kind, data_files=str(Path(loc).expanduser()), split="train")
        if kind == "disk":
            return datasets.load_from_disk(str(_disk_split_dir(source)))
        return _pick_split(datasets.load_dataset(str(loc), split=source.split), source)
    except DataError:
        raise
    except Exception as err:  # datasets and pyarrow raise many types; each becomes one line
        raise DataError(_load_error(source, err, datasets)) from err


def _load_error(source: DataSource, err: Exception, datasets: Any) -> str:
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    key = source.section
    not_found = (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError)
    if source.kind == "hub" and isinstance(err, not_found):
        offline = " and HF_HUB_OFFLINE=1 (no downloads)" if datasets.config.HF_HUB_OFFLINE else ""
        return (f"{source.location}: not a local file or directory, and this hub dataset is not in the local datasets "
                f"cache ({datasets.config.HF_DATASETS_CACHE}){offline}; download it once where the hub is reachable "
                f"(datasets.load_dataset('{source.location}')) or set {key}.file_path to a local copy ({text})")
    if "corresponds to no data" in text:
        return f"{source.label}: {EMPTY}"
    if text.startswith("Unknown split"):
        return f"{source.label}: {text} (set {key}.split)"
    return f"{source.label}: cannot read it as a {source.kind} dataset ({type(err).__name__}: {text})"


def _disk_split_dir(source: DataSource) -> Path:
    """The directory of the wanted split of a save_to_disk directory (a DatasetDict keeps one per
    split; only that one is loaded). An empty split is a `DataError` (datasets fails on it)."""
    path = Path(source.location).expanduser()
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        path = path / _choose_split(splits, source)
    elif source.split:
        _refuse_split(source)
    try:
        empty = json.loads((path / "state.json").read_text(encoding="utf-8")).get("_data_files") == []
    except (OSError, ValueError, AttributeError):
        empty = False  # not a layout this check knows: load_from_disk reports what is wrong
    if empty:
        raise DataError(f"{source.label}: {EMPTY}")
    return path


def _refuse_split(source: DataSource) -> None:
    """`split` set for a source without splits is a mistake (it would be ignored)."""
    if source.split:
        raise DataError(f"{source.label}: {source.section}.split={source.split!r}, but this is a "
                        "single file or Dataset, without splits (split applies to a DatasetDict or a hub dataset); "
                        "unset it")


def _pick_split(data: Any, source: DataSource) -> Any:
    """The split `source.split` of a DatasetDict (its only split when unset); a Dataset as it is."""
    if not hasattr(data, "keys"):  # a Dataset
        if source.split and source.kind != "hub":
            _refuse_split(source)
        return data
    return data[_choose_split(list(data.keys()), source)]


def _choose_split(splits: list[str], source: DataSource) -> str:
    """`source.split`, which must be one of `splits`; unset: the only split there is."""
    key = source.section
    if source.split is None:
        if len(splits) == 1:
            return splits[0]
        raise DataError(f"{source.label}: holds the splits {', '.join(splits)}; set {key}.split to one of them")
    if source.split not in splits:
        raise DataError(f"{source.label}: no split {source.split!r} (splits: {', '.join(splits)}); set {key}.split")
    return source.split


def _read_dataset(ds: Any, source: DataSource, skip_bad: bool) -> list[Conversation]:
    """Rows of a `datasets.Dataset`, read in batches; the conversation column is found once."""
    if len(ds) == 0:
        raise DataError(f"{source.label}: {EMPTY}")
    columns = list(ds.column_names)
    column = source.column
    if column is None:
        found = [c for c in FORMATS if c in columns]
        if len(found) != 1:
            problem = f"several conversation columns ({', '.join(found)})" if found else "no conversation column"
            raise DataError(f"{source.label}: {problem}: expected one of {', '.join(repr(c) for c in FORMATS)} "
                            f"(columns: {', '.join(columns)}); set {source.section}.conversation_column")
        column = found[0]
    elif column not in columns:
        raise DataError(f"{source.label}: no column {column!r} (columns: {', '.join(columns)}); "
                        f"fix {source.section}.conversation_column")
    return _parse_rows(_dataset_rows(ds), source, column, skip_bad)


def _dataset_rows(ds: Any, batch_size: int = 1024) -> Iterable[tuple[int, dict[str, Any]]]:
    """(row index, row) pairs, converted from Arrow a batch at a time (row by row is ~10x slower)."""
    index = 0
    for batch in ds.iter(batch_size=batch_size):
        names = list(batch)
        for values in zip(*(batch[n] for n in names)):
            yield index, dict(zip(names, values))
            index += 1


# ----- every row-based source ----------------------------------------------------------------
def _parse_rows(rows: Iterable[tuple[int, Any]], source: DataSource, column: str | None,
                skip_bad: bool) -> list[Conversation]:
    """`parse_record` over (index, record) pairs; a bad row names the source, the row and the column."""
    label = source.label
    conversations: list[Conversation] = []
    skipped: list[str] = []
    for i, record in rows:
        where = f"{label}: row {i}"
        try:
            if not isinstance(record, Mapping):
                raise RecordError(f"record is a {type(record).__name__}, expected an object (a mapping)")
            conversations.append(parse_record(record, where, column)[1])
        except RecordError as err:
            named = err.column and err.column != _LIST_COLUMN  # a bare list of turns has no column
            message = f"{where}, column {err.column!r}: {err}" if named else f"{where}: {err}"
            if not skip_bad:
                raise DataError(f"{message} ({SKIP_HINT})") from None
            skipped.append(message)
    return check_read(conversations, skipped, label, f"{label}: has no")

