"""DuReaderQG question generation: answer + context -> question.

Records use DuReaderQG's names (`context`, `answer`, `question`) or PaddleNLP's
(`source`, `title`, `target`). As in the reference, answer and context form part A and the
question is generated in part B; the answer comes first so that truncating an over-long context
(from its end) never loses it. The target is the bare question, so metrics score the question
and not a fixed prefix.
"""
from __future__ import annotations

from typing import List

from paddle_glm.data import TextPair, text_field

NAME = "dureader_qg"
DEFAULTS = {"src_length": 608, "tgt_length": 160}


def to_pairs(record: dict, where: str, args=None) -> List[TextPair]:
    context = text_field(record, ("context", "source"), where)
    answer = text_field(record, ("answer", "title"), where)
    question = text_field(record, ("question", "target"), where)
    return [(f"答案：{answer}，上下文：{context}", question)]
