"""Reading JSON-lines data sets with errors that name the file, the line and the field.

A task module (see `tasks/`) turns one JSON record into (source, target) text pairs; this module
reads the records, tokenizes the pairs into GLM examples and keeps the texts that evaluation
needs to write readable predictions.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

from paddlenlp.utils.log import logger

from .inputs import GLMSpecialIds, build_source_ids, generation_example, training_example

__all__ = [
    "DataError", "read_json_lines", "write_json_lines", "text_field", "TextPair", "GLMDataset", "tokenize_pairs",
    "read_pairs",
]

TextPair = Tuple[str, str]  # (source text, target text)


class DataError(ValueError):
    """Bad input data; the message starts with `file:line` and names the field."""


def read_json_lines(path: str) -> Iterator[Tuple[str, dict]]:
    """Yields (`path:line`, record) for every non-blank line; a byte-order mark is accepted."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such data file")
    found = False
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{where}: not UTF-8 text ({error.reason} at byte {error.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object per line, got {type(record).__name__}")
            found = True
            yield where, record
    if not found:
        raise DataError(f"{path}: the file has no examples")


def write_json_lines(records: Iterable[dict], path: str) -> None:
    """Write one JSON object per line (UTF-8, unescaped), atomically: a temporary file, then a rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def text_field(record: dict, names: Sequence[str], where: str, allow_empty: bool = False) -> str:
    """The first present field among `names` (aliases), checked to be a (non-empty) string."""
    for name in names:
        if name in record:
            value = record[name]
            if not isinstance(value, str):
                raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
            if not allow_empty and not value.strip():
                raise DataError(f"{where}: field '{name}' is empty")
            return value
    raise DataError(f"{where}: missing field '{names[0]}'" + (f" (or {', '.join(names[1:])})" if names[1:] else ""))


@dataclass
class GLMDataset:
    """Tokenized examples plus the texts behind them (for predictions files)."""

    features: List[dict]
    sources: List[str] = field(default_factory=list)
    targets: List[str] = field(default_factory=list)
    # What metrics score predictions against: the target as the tokenizer gives it back (truncated to
    # --tgt_length and normalised, e.g. full-width "？" -> "?"), since predictions pass the same way.
    references: List[str] = field(default_factory=list)
    prompts: List[dict] = field(default_factory=list)  # generation prompts, same order

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict:
        return self.features[index]


def tokenize_pairs(
    pairs: List[TextPair], tokenizer, src_length: int, tgt_length: int, truncation_side: str = "right"
) -> GLMDataset:
    """GLM training examples (for training and eval loss) and generation prompts for `pairs`."""
    special = GLMSpecialIds.from_tokenizer(tokenizer)
    dataset = GLMDataset(features=[])
    truncated_sources = truncated_targets = 0
    for source, target in pairs:
        text_ids = _encode(tokenizer, source)
        target_ids = _encode(tokenizer, target)
        truncated_sources += len(text_ids) > src_length - 3
        truncated_targets += len(target_ids) > tgt_length - 1
        source_ids = build_source_ids(text_ids, special, src_length, truncation_side)
        dataset.features.append(training_example(source_ids, target_ids, special, tgt_length))
        dataset.prompts.append(generation_example(source_ids, special))
        dataset.sources.append(source)
        dataset.targets.append(target)
        dataset.references.append(tokenizer.decode(target_ids[: tgt_length - 1], skip_special_tokens=True))
    if truncated_sources or truncated_targets:
        logger.warning(
            f"truncated {truncated_sources} of {len(pairs)} sources to --src_length {src_length} "
            f"(their {truncation_side} end dropped) and {truncated_targets} targets to --tgt_length {tgt_length} "
            "(their end dropped)"
        )
    return dataset


def _encode(tokenizer, text: str) -> List[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def read_pairs(path: str, to_pairs: Callable[[dict, str], List[TextPair]], limit: Optional[int] = None) -> List[TextPair]:
    """All (source, target) pairs of a JSON-lines file, through a task's record mapping."""
    pairs: List[TextPair] = []
    for where, record in read_json_lines(path):
        pairs.extend(to_pairs(record, where))
        if limit is not None and len(pairs) >= limit:
            return pairs[:limit]
    return pairs
