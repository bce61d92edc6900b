"""ADGEN advertisement generation (ChatGLM-6B's P-Tuning v2 example): clothing attributes -> an ad text.

Records are `{"content": "类型#上衣*版型#宽松*风格#休闲*图案#条纹", "summary": "..."}`, the fields of THUDM's
AdvertiseGen files; `--source_field` / `--target_field` name others. As in THUDM's `ptuning/main.py`, the
content is the whole query (no instruction added) and the summary the answer; evaluation scores BLEU-4 and
ROUGE on the summary.
"""
from __future__ import annotations

from typing import List

from paddle_glm.args import DataArguments
from paddle_glm.data import TextPair, text_field

NAME = "adgen"
DEFAULTS = {"src_length": 64, "tgt_length": 128}  # THUDM's max_source_length and max_target_length


def _field(args, name: str, own: str) -> str:
    """The flag's field when one was given (not the generic default), else ADGEN's own."""
    given = getattr(args, name, None) if args is not None else None
    return given if given and given != getattr(DataArguments, name) else own


def to_pairs(record: dict, where: str, args=None) -> List[TextPair]:
    return [(text_field(record, (_field(args, "source_field", "content"),), where),
             text_field(record, (_field(args, "target_field", "summary"),), where))]
