"""ADGEN records -> (content, summary) pairs, and the generated ADGEN demo data."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

import tasks
from paddle_glm.args import DataArguments
from paddle_glm.data import DataError
from paddle_glm.demo_data import ADGEN_ATTRIBUTES, adgen_records
from tasks import adgen

RECORD = {"content": "类型#上衣*版型#宽松*风格#休闲*图案#条纹", "summary": "宽松的条纹上衣。", "title": "条纹上衣"}


def test_content_is_the_query_and_summary_the_answer():
    assert adgen.to_pairs(RECORD, "train.json:1", DataArguments()) == [(RECORD["content"], RECORD["summary"])]
    assert tasks.get_task("adgen") is adgen


def test_source_and_target_fields_override():
    args = SimpleNamespace(source_field="title", target_field="content")
    assert adgen.to_pairs(RECORD, "train.json:1", args) == [("条纹上衣", RECORD["content"])]


def test_missing_summary_names_line_and_field():
    with pytest.raises(DataError, match=r"dev\.json:4: missing field 'summary'"):
        adgen.to_pairs({"content": "类型#上衣"}, "dev.json:4", DataArguments())


def test_demo_summaries_follow_from_the_content():
    """Each summary opens with the type, then one phrase per attribute in the content's order, copying its value."""
    phrases = {key: phrase for key, _, phrase in ADGEN_ATTRIBUTES}
    for record in adgen_records(50, seed=3):
        pairs = [item.split("#") for item in record["content"].split("*")]
        assert pairs[0][0] == "类型" and 3 <= len(pairs) <= 5
        expected = f"这款{pairs[0][1]}，" + "，".join(phrases[key].format(value) for key, value in pairs[1:]) + "。"
        assert record["summary"] == expected
    assert adgen_records(5, seed=3) == adgen_records(5, seed=3) != adgen_records(5, seed=4)
