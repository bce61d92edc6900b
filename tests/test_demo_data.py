"""The generated demo data: reproducible, well-formed and learnable (targets follow from the inputs)."""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict

import pytest

from paddle_glm.data import write_json_lines
from paddle_glm.demo_data import CITIES, belle_records, demo_texts, qg_records, write_demo_splits


def _substrings(text: str, length: int = 2):
    return {text[start:start + length] for start in range(len(text) - length + 1)}


def _form(record: dict) -> str:
    if "conversations" in record:
        return "conversations"
    if record["instruction"].startswith("Human:"):
        return "text dialogue"
    return "with input" if record["input"] else "plain"


@pytest.fixture(scope="module")
def qg():
    return qg_records(500, seed=3)


@pytest.fixture(scope="module")
def belle():
    return belle_records(200, seed=3)


@pytest.mark.parametrize("make", [qg_records, belle_records])
def test_records_are_reproducible_from_the_seed(make):
    assert make(50, 7) == make(50, 7)
    assert make(50, 7) != make(50, 8)
    assert len(make(51, 7)) == 51


def test_qg_records_are_well_formed(qg):
    for record in qg:
        assert set(record) == {"context", "answer", "question"}
        assert all(isinstance(value, str) and value.strip() for value in record.values())
        assert record["answer"] in record["context"], record
        assert record["answer"] not in record["question"], record
        assert 15 <= len(record["context"]) <= 60 and 6 <= len(record["question"]) <= 24, record


def test_qg_questions_copy_an_entity_of_their_context(qg):
    # A span counts as an entity when few contexts hold it; template words ("的首都", "出生于") are in many.
    contexts = {record["context"] for record in qg}
    holders = defaultdict(int)
    for context in contexts:
        for span in _substrings(context):
            holders[span] += 1
    for record in qg:
        shared = _substrings(record["question"]) & _substrings(record["context"])
        assert any(holders[span] < 0.05 * len(contexts) for span in shared), record


def test_qg_questions_depend_on_the_answer(qg):
    asked = defaultdict(dict)  # context -> answer -> question
    for record in qg:
        previous = asked[record["context"]].setdefault(record["answer"], record["question"])
        assert previous == record["question"], record
    several = [questions for questions in asked.values() if len(questions) > 1]
    assert several, "no context is asked about two different answers"
    assert all(len(set(questions.values())) == len(questions) for questions in several)


def test_belle_mixes_all_four_forms(belle):
    assert {_form(record) for record in belle} == {"plain", "with input", "conversations", "text dialogue"}


def test_belle_text_dialogues_end_with_a_human_turn(belle):
    for record in (r for r in belle if _form(r) == "text dialogue"):
        turns = re.findall(r"^(Human|Assistant): ", record["instruction"], flags=re.M)
        assert len(turns) >= 3 and turns[-1] == "Human" and record["output"].strip()
        assert turns == ["Human", "Assistant"] * (len(turns) // 2) + ["Human"]


def test_belle_targets_are_computed_from_the_inputs(belle):
    checked = defaultdict(int)
    for record in belle:
        if _form(record) == "with input":
            instruction, text, output = record["instruction"], record["input"], record["output"]
            if "数字相加" in instruction:
                a, b = map(int, re.fullmatch(r"(\d+)和(\d+)", text).groups())
                assert output == str(a + b)
            elif "倒序" in instruction:
                assert output == text[::-1]
            elif "两遍" in instruction:
                assert output == text * 2
            else:
                assert "城市名" in instruction and output in CITIES and output in text
            checked[instruction] += 1
        elif _form(record) == "conversations":
            values = [turn["value"] for turn in record["conversations"]]
            assert [turn["from"] for turn in record["conversations"]] == ["human", "gpt"] * (len(values) // 2)
            for value in values:
                for a, b, total in re.findall(r"(\d+)加(\d+)等于(\d+)", value):
                    assert int(a) + int(b) == int(total), value
                    checked["dialogue sum"] += 1
                if value.startswith("请把“") and value.endswith("”倒过来写。"):
                    assert values[1] == value[3:-6][::-1] and values[3] == value[3:-6]
                    checked["dialogue reversal"] += 1
    assert len(checked) == 6, checked


def test_demo_texts_yield_every_text_field():
    records = [
        {"context": "甲", "answer": "乙", "question": "丙"},
        {"instruction": "丁", "input": "", "output": "戊"},
        {"conversations": [{"from": "human", "value": "己"}, {"from": "gpt", "value": "庚"}]},
    ]
    assert list(demo_texts(records)) == ["甲", "乙", "丙", "丁", "戊", "己", "庚"]


def test_write_json_lines_round_trips_unescaped(tmp_path):
    records = qg_records(20, seed=1) + belle_records(20, seed=1)
    path = tmp_path / "new" / "dir" / "data.json"
    write_json_lines(records, str(path))
    text = path.read_text(encoding="utf-8")
    assert "\\u" not in text and records[0]["context"] in text
    assert [json.loads(line) for line in text.splitlines()] == records
    assert os.listdir(path.parent) == ["data.json"]  # no temporary file left behind


def test_write_json_lines_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "data.json"
    write_json_lines([{"a": "旧"}], str(path))
    with pytest.raises(TypeError):
        write_json_lines([{"a": "新"}, {"b": object()}], str(path))
    assert path.read_text(encoding="utf-8") == '{"a": "旧"}\n'
    assert os.listdir(tmp_path) == ["data.json"]


@pytest.mark.parametrize("kind", ["qg", "belle", "adgen"])
def test_write_demo_splits_writes_the_requested_counts(tmp_path, kind):
    paths = write_demo_splits(str(tmp_path / kind), kind, train=30, dev=7, seed=2)
    assert set(paths) == {"train", "dev"}
    for split, count in (("train", 30), ("dev", 7)):
        assert paths[split] == str(tmp_path / kind / f"{split}.json")
        with open(paths[split], encoding="utf-8") as handle:
            assert len([json.loads(line) for line in handle]) == count


def test_write_demo_splits_rejects_unknown_kinds(tmp_path):
    with pytest.raises(ValueError, match="unknown demo data kind"):
        write_demo_splits(str(tmp_path), "squad", train=1, dev=1)


def test_dev_pairs_are_mostly_new(tmp_path):
    paths = write_demo_splits(str(tmp_path), "qg", train=1000, dev=200, seed=0)
    splits = {}
    for split, path in paths.items():
        with open(path, encoding="utf-8") as handle:
            splits[split] = [json.loads(line) for line in handle]
    seen = {(record["context"], record["answer"]) for record in splits["train"]}
    repeated = sum((record["context"], record["answer"]) in seen for record in splits["dev"])
    assert repeated < 0.2 * len(splits["dev"])
