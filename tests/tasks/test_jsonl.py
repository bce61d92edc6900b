"""Generic JSON-lines task: the source and target fields come from the data arguments (--source_field,
--target_field, parsed as the recipe parses them)."""
from __future__ import annotations

import pytest
from paddlenlp.trainer import PdArgumentParser

import tasks
from paddle_glm.args import DataArguments
from paddle_glm.data import DataError
from tasks import jsonl

RECORD = {"src": "问题", "tgt": "回答", "prompt": "另一个问题"}


def data_args(*flags: str) -> DataArguments:
    (args,) = PdArgumentParser(DataArguments).parse_args_into_dataclasses(args=["--task_name", "jsonl", *flags])
    return args


def test_to_pairs_uses_the_default_fields():
    assert jsonl.to_pairs(RECORD, "a.jsonl:1", data_args()) == [("问题", "回答")]


def test_to_pairs_other_source_field_changes_pair():
    assert jsonl.to_pairs(RECORD, "a.jsonl:1", data_args("--source_field", "prompt")) == [("另一个问题", "回答")]
    swapped = data_args("--source_field", "tgt", "--target_field", "prompt")
    assert jsonl.to_pairs(RECORD, "a.jsonl:1", swapped) == [("回答", "另一个问题")]


def test_to_pairs_missing_configured_field_names_it():
    with pytest.raises(DataError, match=r"a\.jsonl:3: missing field 'answer'"):
        jsonl.to_pairs(RECORD, "a.jsonl:3", data_args("--target_field", "answer"))


@pytest.mark.parametrize("name", ["dureader_qg", "belle", "jsonl"])
def test_get_task_returns_module_by_name(name):
    task = tasks.get_task(name)
    assert task.NAME == name and callable(task.to_pairs) and isinstance(task.DEFAULTS, dict)


def test_get_task_unknown_name_lists_choices():
    with pytest.raises(ValueError) as error:
        tasks.get_task("squad")
    message = str(error.value)
    assert "'squad'" in message and "belle, dureader_qg, jsonl" in message
