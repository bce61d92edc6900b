"""The model families behind one registry, keyed by `config.json`.

Each family is one module (model, tokenizer loading, template, positions and masks, cache geometry) exposing a
`FAMILY`; the pipeline asks `family_of(path)` and never branches on the family. Adding a family: its module, its
tests and one line in `FAMILIES`.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Union

from .family import Family, Template
from .chatglm import FAMILY as CHATGLM
from .chatglm2 import FAMILY as CHATGLM2
from .glm import FAMILY as GLM

__all__ = ["FAMILIES", "Family", "Template", "family_of", "load_model", "load_tokenizer", "load_template"]

FAMILIES: Dict[str, Family] = {family.name: family for family in (GLM, CHATGLM, CHATGLM2)}


def family_of(source: Union[str, dict, object]) -> Family:
    """The family of a checkpoint or export directory, a config (dict or PaddleNLP config), or a model name."""
    config = _config_dict(source)
    if config is not None:
        for family in FAMILIES.values():
            if family.claims(config):
                return family
        raise ValueError(f"{_describe(source)}: model_type {config.get('model_type')!r} is not a family this toolkit "
                         f"knows ({', '.join(sorted(t for f in FAMILIES.values() for t in f.model_types))})")

    name = str(source).lower().replace("-", "").replace("_", "")  # a model name to download: THUDM/glm-10b
    matches = [(len(pattern), family) for family in FAMILIES.values() for pattern in family.name_patterns
               if pattern in name]
    if matches:
        return max(matches, key=lambda match: match[0])[1]  # the most specific: chatglm3 before glm
    raise ValueError(f"{source}: neither a directory with a config.json nor a model name of a known family")


def _config_dict(source) -> Union[dict, None]:
    """What identifies a family: a config, or the first of config.json (a checkpoint), export_config.json (an
    export: its `family`) and tokenizer_config.json (a tokenizer alone: its `tokenizer_class`) in a directory."""
    if isinstance(source, dict):
        return source
    if hasattr(source, "to_dict"):  # a PaddleNLP config
        return {**source.to_dict(), "model_type": getattr(source, "model_type", None)}
    for name in ("config.json", "export_config.json", "tokenizer_config.json"):
        path = os.path.join(str(source), name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                return json.load(handle)
    return None


def _describe(source) -> str:
    return str(source) if isinstance(source, str) else "the config"


def load_model(name_or_path: str, **kwargs):
    """The family's model `from_pretrained` (strict: a checkpoint that does not fit is an error)."""
    return family_of(name_or_path).model_class.from_pretrained(name_or_path, **kwargs)


def load_tokenizer(name_or_path: str):
    """The family's tokenizer, its special tokens checked."""
    return family_of(name_or_path).load_tokenizer(name_or_path)


def load_template(name_or_path: str) -> Template:
    """The family's template bound to the tokenizer saved at `name_or_path`."""
    family = family_of(name_or_path)
    return family.template(family.load_tokenizer(name_or_path))
