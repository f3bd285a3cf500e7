import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
from pathlib import Path

import pytest

from spinlm.data.chat import Conversation, Turn, read_chat_jsonl
from spinlm.errors import DataError

NEMO_FILE = Path(__file__).resolve().parents[2] / "examples" / "data" / "nemo_dummy_sft.jsonl"

NEMO = {
    "system": "Be brief.",
    "mask": "User",
    "dataset": "x",
    "conversations": [
        {"from": "User", "value": "Hi"},
        {"from": "Assistant", "value": "Hello"},
        {"from": "user", "value": "2+2?"},
        {"from": "ASSISTANT", "value": "4"},
    ],
}
HF = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
}
EXPECTED_TURNS = (Turn("user", "Hi"), Turn("assistant", "Hello"), Turn("user", "2+2?"), Turn("assistant", "4"))


def write_lines(tmp_path: Path, lines: list[str], name: str = "d.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def records(tmp_path: Path, *recs) -> Path:
    return write_lines(tmp_path, [r if isinstance(r, str) else json.dumps(r) for r in recs])


def test_both_formats_read_to_the_same_conversation(tmp_path):
    nemo = read_chat_jsonl(records(tmp_path, NEMO))
    hf = read_chat_jsonl(write_lines(tmp_path, [json.dumps(HF)], "hf.jsonl"))
    assert nemo[0].turns == hf[0].turns == EXPECTED_TURNS
    assert nemo[0].system == hf[0].system == "Be brief."
    assert nemo[0].source.endswith("d.jsonl:1") and hf[0].source.endswith("hf.jsonl:1")


@pytest.mark.parametrize("system", [None, ""])
def test_missing_or_empty_system_is_none(tmp_path, system):
    rec = {k: v for k, v in NEMO.items() if k != "system"}
    if system is not None:
        rec["system"] = system
    assert read_chat_jsonl(records(tmp_path, rec))[0].system is None


def test_hf_without_system(tmp_path):
    rec = {"messages": HF["messages"][1:]}
    conv = read_chat_jsonl(records(tmp_path, rec))[0]
    assert conv == Conversation(EXPECTED_TURNS, None, conv.source)


def test_blank_lines_are_skipped_and_line_numbers_kept(tmp_path):
    path = write_lines(tmp_path, ["", json.dumps(NEMO), "   ", json.dumps(NEMO)])
    convs = read_chat_jsonl(path)
    assert [c.source for c in convs] == [f"{path}:2", f"{path}:4"]


def test_mixed_formats_error_names_the_line(tmp_path):
    path = records(tmp_path, NEMO, NEMO, HF)
    with pytest.raises(DataError, match=r"d\.jsonl:3: .*one format"):
        read_chat_jsonl(path)


def turns(*pairs):
    return {"conversations": [{"from": r, "value": v} for r, v in pairs]}


BAD_RECORDS = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected an object"),
    ({"foo": []}, "neither 'conversations'"),
    ({"conversations": "Hi"}, "must be a list"),
    ({"messages": {"role": "user"}}, "must be a list"),
    ({"conversations": ["Hi", "Hello"]}, "expected an object"),
    ({"conversations": [{"from": "User"}]}, "missing key(s) 'value'"),
    ({"messages": [{"content": "Hi"}]}, "missing key(s) 'role'"),
    (turns(("User", "Hi"), ("Bot", "Hello")), "unknown role 'Bot'"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "system", "content": "x"}]}, "unknown role 'system'"),
    (turns(("Assistant", "Hello"), ("User", "Hi"), ("Assistant", "x")), "must alternate"),
    (turns(("User", "Hi"), ("User", "Hi again"), ("Assistant", "x")), "must alternate"),
    (turns(("User", "Hi"), ("Assistant", "Hello"), ("User", "Bye")), "no final assistant turn"),
    (turns(), "no turns"),
    (turns(("User", "Hi"), ("Assistant", "  \n")), "empty content"),
    (turns(("User", ""), ("Assistant", "x")), "empty content"),
    ({"conversations": [{"from": "User", "value": 3}, {"from": "Assistant", "value": "x"}]}, "must be a string"),
    ({"system": 1, **turns(("User", "Hi"), ("Assistant", "x"))}, "'system' must be a string"),
    ({"conversations": [], "messages": []}, "both"),
]


@pytest.mark.parametrize("bad, problem", BAD_RECORDS, ids=[p for _, p in BAD_RECORDS])
def test_bad_record_names_path_line_and_problem(tmp_path, bad, problem):
    path = records(tmp_path, NEMO, bad if isinstance(bad, str) else json.dumps(bad))
    with pytest.raises(DataError) as err:
        read_chat_jsonl(path)
    assert str(err.value).startswith(f"{path}:2: ")
    assert problem in str(err.value)


def test_first_error_wins(tmp_path):
    path = records(tmp_path, NEMO, "{bad", "[1]")
    with pytest.raises(DataError, match=r":2: not valid JSON"):
        read_chat_jsonl(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found") as err:
        read_chat_jsonl(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(err.value)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "e.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=r"e\.jsonl:1: file has no records"):
        read_chat_jsonl(path)


def test_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(json.dumps(NEMO).encode() + b"\n" + '{"x": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(DataError, match=r"latin\.jsonl:2: not valid UTF-8"):
        read_chat_jsonl(path)


def test_real_nemo_file_reads_with_multi_turn_context():
    convs = read_chat_jsonl(NEMO_FILE)
    # 30 records on 29 newlines: the file has no trailing newline.
    assert len(convs) == 30
    assert all(c.turns[0].role == "user" and c.turns[-1].role == "assistant" for c in convs)
    assert max(len(c.turns) for c in convs) == 12
    assert all(c.system is None for c in convs)  # every record has "system": ""
