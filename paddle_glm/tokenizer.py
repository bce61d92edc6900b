"""Loading GLM tokenizers with their special tokens really registered.

`GLMChineseTokenizer` built straight from a sentencepiece file maps every special token
(`[gMASK]`, `<|startofpiece|>`, ...) to id 0 until `sanitize_special_tokens()` runs; training on
such ids silently teaches the model nothing about the blank. Every tokenizer we hand out goes
through `_checked`.
"""
from __future__ import annotations

import os

from paddlenlp.transformers import AutoTokenizer, GLMChineseTokenizer, PretrainedTokenizer

__all__ = ["load_tokenizer", "tokenizer_from_sentencepiece", "SPECIAL_TOKEN_ATTRIBUTES"]

# The special tokens GLM's blank infilling needs, by tokenizer attribute.
SPECIAL_TOKEN_ATTRIBUTES = (
    "pad_token_id", "eos_token_id", "cls_token_id", "sop_token_id", "eop_token_id", "gmask_token_id", "smask_token_id",
)


def load_tokenizer(name_or_path: str) -> PretrainedTokenizer:
    """A GLM tokenizer from a model name, a checkpoint directory, or a sentencepiece `.model` file."""
    if os.path.isfile(name_or_path) and name_or_path.endswith(".model"):
        return tokenizer_from_sentencepiece(name_or_path)
    return _checked(AutoTokenizer.from_pretrained(name_or_path))


def tokenizer_from_sentencepiece(model_file: str) -> GLMChineseTokenizer:
    """A `GLMChineseTokenizer` over a sentencepiece model (e.g. `cog-pretrain.model`)."""
    if not os.path.isfile(model_file):
        raise FileNotFoundError(f"sentencepiece model not found: {model_file}")
    return _checked(GLMChineseTokenizer(model_file=model_file))


def _checked(tokenizer: PretrainedTokenizer) -> PretrainedTokenizer:
    tokenizer.sanitize_special_tokens()
    ids = {name: getattr(tokenizer, name, None) for name in SPECIAL_TOKEN_ATTRIBUTES}
    missing = [name for name, value in ids.items() if value is None]
    if missing:
        raise ValueError(f"{type(tokenizer).__name__} is not a GLM tokenizer: it has no {', '.join(missing)}")
    distinct = {name: value for name, value in ids.items() if name != "eos_token_id"}  # GLM: eos == pad
    if len(set(distinct.values())) != len(distinct):
        raise ValueError(f"GLM special tokens share ids, the tokenizer files are broken: {ids}")
    return tokenizer
