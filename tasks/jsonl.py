"""Any JSON-lines data set: one source field and one target field per record.

Field names come from `--source_field` and `--target_field` (default `src` and `tgt`).
"""
from __future__ import annotations

from typing import List

from paddle_glm.data import TextPair, text_field

NAME = "jsonl"
DEFAULTS = {}


def to_pairs(record: dict, where: str, args) -> List[TextPair]:
    return [(text_field(record, (args.source_field,), where), text_field(record, (args.target_field,), where))]
