"""Every kind of data source reads to the same conversations; bad ones fail with one line naming
the source, the row and the column. Sources read through `datasets` skip without it."""

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
from conftest import cache_hub_dataset  # noqa: E402

from spinlm.data.chat import Conversation, Turn  # noqa: E402
from spinlm.data.sources import DataSource, read_conversations, source_kind  # noqa: E402
from spinlm.errors import DataError  # noqa: E402

MESSAGES = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"What is {i} + 1?"},
     {"role": "assistant", "content": f"{i + 1}."}]
    for i in range(5)
]
ROWS = [{"messages": m, "id": i} for i, m in enumerate(MESSAGES)]
EXPECTED = [Conversation((Turn("user", f"What is {i} + 1?"), Turn("assistant", f"{i + 1}.")), "Be brief.")
            for i in range(5)]
PAPER = [{"real": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}],
          "generated": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"G{i}" if i else ""}]}
         for i in range(3)]


def turns_of(convs):
    return [(c.turns, c.system) for c in convs]


# ----- each input form -----------------------------------------------------------------------
def test_jsonl_and_json_array_and_json_lines(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    array = tmp_path / "d.json"
    array.write_text(json.dumps(ROWS, indent=2))
    lines = tmp_path / "lines.json"
    lines.write_text(jsonl.read_text())
    for path in (jsonl, array, lines):
        convs = read_conversations(path)
        assert turns_of(convs) == turns_of(EXPECTED), path
    assert read_conversations(array)[3].source == f"{array}: row 3"
    assert read_conversations(lines)[3].source == f"{lines}:4"
    assert read_conversations(array)[0].extra == {"id": 0}


def test_in_memory_lists(tmp_path):
    as_records = read_conversations(DataSource(ROWS, key="model.data.train_ds"))
    as_messages = read_conversations(DataSource(MESSAGES))
    as_nemo = read_conversations([[{"from": "User", "value": "Hi"}, {"from": "Assistant", "value": "Hello"}]])
    assert turns_of(as_records) == turns_of(as_messages) == turns_of(EXPECTED)
    assert as_records[2].source == "model.data.train_ds (in-memory list): row 2"
    assert as_nemo[0].turns == (Turn("user", "Hi"), Turn("assistant", "Hello"))
    given = read_conversations(EXPECTED)
    assert turns_of(given) == turns_of(EXPECTED) and given[1].source == "data (in-memory list): row 1"


def test_parquet_arrow_and_save_to_disk(hf_datasets, tmp_path):
    ds = hf_datasets.Dataset.from_list(ROWS)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "disk"))
    hf_datasets.DatasetDict({"train_sft": ds, "test_sft": ds.select(range(2))}).save_to_disk(str(tmp_path / "dict"))
    arrow = next((tmp_path / "disk").glob("*.arrow"))
    for source in (DataSource(tmp_path / "d.parquet"), DataSource(str(arrow)), DataSource(tmp_path / "disk"),
                   DataSource(tmp_path / "dict", split="train_sft"), DataSource(ds),
                   DataSource(ds.to_pandas().to_dict("records"))):
        assert turns_of(read_conversations(source)) == turns_of(EXPECTED), source
    assert len(read_conversations(DataSource(tmp_path / "dict", split="test_sft"))) == 2
    assert read_conversations(tmp_path / "d.parquet")[4].source == f"{tmp_path / 'd.parquet'}: row 4"
    assert read_conversations(tmp_path / "d.parquet")[4].extra == {"id": 4}


def test_hub_id_reads_from_the_local_cache_offline(hf_datasets, tmp_path):
    cache_hub_dataset(hf_datasets, "acme/chat_200k", {"train_sft": ROWS, "test_sft": ROWS[:2]}, tmp_path)
    source = DataSource("acme/chat_200k", split="train_sft", key="model.data.train_ds")
    assert source.kind == "hub"
    convs = read_conversations(source)
    assert turns_of(convs) == turns_of(EXPECTED)
    assert convs[0].source == "acme/chat_200k (split train_sft): row 0"


def test_hub_id_not_cached_is_one_clear_line(hf_datasets):
    with pytest.raises(DataError) as err:
        read_conversations(DataSource("acme/not_downloaded", split="train", key="model.data.train_ds"))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("acme/not_downloaded: not a local file or directory, and this hub dataset is not in "
                              "the local datasets cache")
    assert "HF_HUB_OFFLINE=1" in message and "model.data.train_ds.file_path" in message


def test_paper_rows_real_is_the_conversation_generated_the_opponent(hf_datasets, tmp_path):
    hf_datasets.Dataset.from_list(PAPER).to_parquet(str(tmp_path / "spin_iter0.parquet"))
    convs = read_conversations(tmp_path / "spin_iter0.parquet")
    assert [c.turns for c in convs] == [(Turn("user", f"Q{i}"), Turn("assistant", f"A{i}")) for i in range(3)]
    assert [c.generated for c in convs] == ["", "G1", "G2"]  # an empty generated answer is an answer
    real_only = read_conversations([{"real": PAPER[1]["real"]}])
    assert real_only[0].generated is None and real_only[0].turns == convs[1].turns


def test_conversation_column_names_another_column(hf_datasets, tmp_path):
    rows = [{"chat": m, "prompt": m[1]["content"]} for m in MESSAGES]
    ds = hf_datasets.Dataset.from_list(rows)
    assert turns_of(read_conversations(DataSource(ds, column="chat"))) == turns_of(EXPECTED)
    with pytest.raises(DataError, match=r"no conversation column: expected one of .*columns: chat, prompt.*"
                                        r"model\.data\.train_ds\.conversation_column"):
        read_conversations(DataSource(ds, key="model.data.train_ds"))
    with pytest.raises(DataError, match=r"no column 'dialog' \(columns: chat, prompt\)"):
        read_conversations(DataSource(ds, column="dialog"))


# ----- bad inputs: one line each, naming the source, row and column --------------------------
def bad_rows(hf_datasets, rows):
    return DataSource(hf_datasets.Dataset.from_list(rows), key="model.data.train_ds")


@pytest.mark.parametrize("rows, message", [
    ([{"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": 2}]}],
     "row 0, column 'messages': messages[0]: content must be a string, got int"),
    ([ROWS[0], {"messages": None, "id": 9}], "row 1, column 'messages': 'messages' must be a list, got NoneType"),
    ([{"messages": "hi there"}], "row 0, column 'messages': 'messages' must be a list, got str"),
    ([ROWS[0], {"messages": [{"role": "user", "content": "Hi"}], "id": 1}],
     "row 1, column 'messages': no final assistant turn"),
    ([{"conversations": [{"from": "Human", "value": "Hi"}, {"from": "Assistant", "value": "Hello"}]}],
     "row 0, column 'conversations': conversations[0]: unknown role 'Human'"),
    ([{"real": PAPER[0]["real"], "generated": [{"role": "user", "content": "other"},
                                               {"role": "assistant", "content": "x"}]}],
     "row 0, column 'generated': 'generated' must repeat the turns of 'real' before its final answer"),
], ids=["int_content", "null_list", "string_not_list", "no_answer", "unknown_role", "generated_differs"])
def test_bad_row_names_row_and_column(hf_datasets, rows, message):
    with pytest.raises(DataError) as err:
        read_conversations(bad_rows(hf_datasets, rows))
    assert str(err.value).startswith("model.data.train_ds (in-memory Dataset): ")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_skip_bad_drops_bad_rows_and_counts_them(hf_datasets, caplog):
    rows = [ROWS[0], {"messages": [{"role": "user", "content": "Hi"}], "id": 1}, ROWS[2]]
    assert len(read_conversations(bad_rows(hf_datasets, rows), skip_bad=True)) == 2
    assert "skipped 1 bad record(s)" in caplog.text and "row 1" in caplog.text


def test_empty_split_and_split_problems(hf_datasets, tmp_path):
    ds = hf_datasets.Dataset.from_list(ROWS)
    hf_datasets.DatasetDict({"train": ds, "test": ds.select([])}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match=r"dict \(split test\): no rows \(an empty split or file\)"):
        read_conversations(DataSource(tmp_path / "dict", split="test"))
    with pytest.raises(DataError, match=r"holds the splits train, test; set model\.data\.validation_ds\.split"):
        read_conversations(DataSource(tmp_path / "dict", key="model.data.validation_ds"))
    with pytest.raises(DataError, match=r"no split 'dev' \(splits: train, test\)"):
        read_conversations(DataSource(tmp_path / "dict", split="dev"))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(DataError, match=r"single file or Dataset, without splits"):
        read_conversations(DataSource(tmp_path / "d.parquet", split="train"))
    (tmp_path / "d.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl \(split train\): model\.data\.train_ds\.split='train', but"):
        read_conversations(DataSource(tmp_path / "d.jsonl", split="train", key="model.data.train_ds"))


def test_paths_that_are_nothing(tmp_path):
    with pytest.raises(DataError, match=r"nope\.parquet:0: file not found \(model\.data\.train_ds\.file_path\)"):
        source_kind(DataSource(str(tmp_path / "nope.parquet"), key="model.data.train_ds"))
    with pytest.raises(DataError, match="not one written by Dataset.save_to_disk"):
        source_kind(DataSource(tmp_path))
    assert source_kind(DataSource("data/train.jsonl")) != "hub" if Path("data/train.jsonl").exists() else True
    with pytest.raises(DataError, match="file not found"):
        source_kind(DataSource("data/train.jsonl"))  # a relative path with a data suffix is not a hub id
    assert source_kind(DataSource("HuggingFaceH4/ultrachat_200k")) == "hub"


def test_bad_json_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([ROWS[0], {"messages": [{"role": "user", "content": "Hi"}]}]))
    with pytest.raises(DataError, match=r"d\.json: row 1, column 'messages': no final assistant turn"):
        read_conversations(path)
    path.write_text('[{"messages": [}')
    with pytest.raises(DataError, match=r"d\.json:1: not valid JSON"):
        read_conversations(path)
    path.write_text(json.dumps([ROWS[0], {"conversations": []}]))
    with pytest.raises(DataError, match=r"row 1, column 'messages': record has no 'messages' key"):
        read_conversations(path)  # one format per file, as for JSONL
