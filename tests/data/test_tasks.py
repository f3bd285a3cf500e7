import json

import pytest

from spinlm.data.answers import extract_answer, normalize_answer
from spinlm.data.chat import read_chat_jsonl
from spinlm.data.tasks import SKILLS, SPLITS, generate_task, write_task

SIZES = {"train": 300, "validation": 60, "test": 60}


@pytest.fixture(scope="module")
def task():
    return generate_task(SIZES, seed=3)


def test_same_seed_same_task_other_seed_other_task(task):
    assert generate_task(SIZES, seed=3) == task
    assert generate_task(SIZES, seed=4) != task


def test_split_sizes_and_disjoint_questions(task):
    keys = {}
    for split in SPLITS:
        assert len(task[split]) == SIZES[split]
        keys[split] = {tuple(m["content"] for m in r["messages"] if m["role"] == "user") for r in task[split]}
        assert len(keys[split]) == SIZES[split]
    assert not keys["train"] & keys["test"]
    assert not keys["train"] & keys["validation"]
    assert not keys["validation"] & keys["test"]


def test_every_answer_verifies_with_the_extractor(task):
    for record in (r for split in SPLITS for r in task[split]):
        final = record["messages"][-1]
        assert final["role"] == "assistant"
        assert final["content"].endswith(f"The answer is {record['answer']}.")
        assert extract_answer(final["content"]) == normalize_answer(record["answer"])


def test_answers_are_right(task):
    for record in task["train"]:
        question = record["messages"][-2]["content"]
        if record["skill"] == "sort":
            numbers = [int(x) for x in question.split(":")[1].rstrip(".").split(",")]
            assert record["answer"] == ", ".join(map(str, sorted(numbers)))
        if record["skill"] == "add" and question.startswith("What is") and "+" in question:
            a, b = question[len("What is "):-1].split(" + ")
            assert int(record["answer"]) == int(a) + int(b)


def test_all_skills_system_prompts_and_multi_turn(task):
    train = task["train"]
    assert {r["skill"] for r in train} == set(SKILLS)
    with_system = sum(r["messages"][0]["role"] == "system" for r in train) / len(train)
    assert 0.2 < with_system < 0.4
    assert all(sum(m["role"] == "user" for m in r["messages"]) == 2 for r in train if r["skill"] == "follow_up")


def test_written_files_read_as_chat_data(tmp_path):
    paths = write_task(tmp_path, {"train": 20, "validation": 5, "test": 5}, seed=0)
    assert set(paths) == set(SPLITS)
    conversations = read_chat_jsonl(paths["train"])
    assert len(conversations) == 20
    first = json.loads(paths["train"].read_text().splitlines()[0])
    assert conversations[0].turns[-1].content == first["messages"][-1]["content"]
