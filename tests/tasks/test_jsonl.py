"""Generic JSON-lines task: the source and target fields come from the data arguments."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

import tasks
from paddle_glm.data import DataError
from tasks import jsonl

RECORD = {"src": "问题", "tgt": "回答", "prompt": "另一个问题"}


def test_to_pairs_uses_configured_fields():
    args = SimpleNamespace(source_field="src", target_field="tgt")
    assert jsonl.to_pairs(RECORD, "a.jsonl:1", args) == [("问题", "回答")]


def test_to_pairs_other_source_field_changes_pair():
    args = SimpleNamespace(source_field="prompt", target_field="tgt")
    assert jsonl.to_pairs(RECORD, "a.jsonl:1", args) == [("另一个问题", "回答")]


def test_to_pairs_missing_configured_field_names_it():
    args = SimpleNamespace(source_field="src", target_field="answer")
    with pytest.raises(DataError, match=r"a\.jsonl:3: missing field 'answer'"):
        jsonl.to_pairs(RECORD, "a.jsonl:3", args)


@pytest.mark.parametrize("name", ["dureader_qg", "belle", "jsonl"])
def test_get_task_returns_module_by_name(name):
    task = tasks.get_task(name)
    assert task.NAME == name and callable(task.to_pairs) and isinstance(task.DEFAULTS, dict)


def test_get_task_unknown_name_lists_choices():
    with pytest.raises(ValueError) as error:
        tasks.get_task("squad")
    message = str(error.value)
    assert "'squad'" in message and "belle, dureader_qg, jsonl" in message
