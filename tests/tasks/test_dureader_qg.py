"""DuReaderQG records -> (source, target) pairs, under both field-name conventions."""
from __future__ import annotations

import pytest

from paddle_glm.data import DataError
from tasks import dureader_qg

WHERE = "dev.json:7"
DUREADER = {"context": "北京是中国的首都。", "answer": "北京", "question": "中国的首都是哪里？"}
PADDLENLP = {"source": "北京是中国的首都。", "title": "北京", "target": "中国的首都是哪里？"}


def test_to_pairs_dureader_names_put_answer_before_context():
    assert dureader_qg.to_pairs(DUREADER, WHERE) == [("答案：北京，上下文：北京是中国的首都。", "中国的首都是哪里？")]


def test_to_pairs_paddlenlp_names_give_the_same_pair():
    assert dureader_qg.to_pairs(PADDLENLP, WHERE) == dureader_qg.to_pairs(DUREADER, WHERE)


@pytest.mark.parametrize("field", ["context", "answer", "question"])
def test_to_pairs_missing_field_names_line_and_field(field):
    record = {k: v for k, v in DUREADER.items() if k != field}
    with pytest.raises(DataError) as error:
        dureader_qg.to_pairs(record, WHERE)
    assert WHERE in str(error.value) and repr(field) in str(error.value)


def test_to_pairs_non_string_field_names_field_and_type():
    with pytest.raises(DataError, match=r"dev\.json:7: field 'answer' must be a string, got int"):
        dureader_qg.to_pairs(dict(DUREADER, answer=42), WHERE)


@pytest.mark.parametrize("value", ["", "  \t"])
def test_to_pairs_empty_field_is_an_error(value):
    with pytest.raises(DataError, match=r"dev\.json:7: field 'title' is empty"):
        dureader_qg.to_pairs(dict(PADDLENLP, title=value), WHERE)
