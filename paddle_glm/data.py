"""Reading JSON-lines data sets with errors that name the file, the line and the field.

A task module (see `tasks/`) turns one JSON record into (source, target) text pairs (with the dialogue history
when there is one); this module reads the records, turns the pairs into model examples through the family's
template and keeps the texts that evaluation needs to write readable predictions.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

from .logs import logger

from .args import InputError

__all__ = [
    "DataError", "read_json_lines", "read_text_lines", "write_json_lines", "text_field", "TextPair", "GLMDataset",
    "tokenize_pairs", "read_pairs", "summarize_skipped", "MAX_LINE_BYTES", "Sample",
]

class Sample(NamedTuple):
    """One (source, target) pair; in a dialogue the source is the last query and `history` the rounds before it."""

    source: str
    target: str
    history: Tuple[Tuple[str, str], ...] = ()


TextPair = Union[Tuple[str, str], Sample]  # what tasks return: (source, target) or a Sample


class DataError(InputError):
    """Bad input data (an `InputError`, so a `ValueError`); the message starts with `file:line` and names the field."""


# A longer line is refused rather than read into memory: such a file is rarely JSON lines (one example per line).
MAX_LINE_BYTES = 64 * 1024 * 1024
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")  # also the start of UTF-32's

LineError = Callable[[int, DataError], None]


def read_json_lines(path: str, on_error: Optional[LineError] = None) -> Iterator[Tuple[str, dict]]:
    """Yields (`path:line`, record) for every non-blank line; a UTF-8 byte-order mark is accepted.

    A line that is no JSON object (not UTF-8, invalid JSON, another JSON value, over MAX_LINE_BYTES) raises a
    DataError naming `path:line`; with `on_error`, it goes to `on_error(line_number, error)` instead and
    reading goes on. A missing file, a UTF-16 file or a file without records always raises.
    """
    return _read_lines(path, _parse_line, on_error)


def read_text_lines(path: str, on_error: Optional[LineError] = None) -> Iterator[Tuple[str, str]]:
    """Yields (`path:line`, text without its line break) for every non-blank line of a UTF-8 text file (one
    document a line, as pre-training corpora come), with `read_json_lines`'s errors and `on_error`."""
    return _read_lines(path, _text_line, on_error)


def _read_lines(path: str, parse: Callable[[Optional[bytes], str], object], on_error: Optional[LineError]):
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such data file")
    found = errors = 0
    with open(path, "rb") as handle:
        if handle.read(2) in _UTF16_BOMS:
            raise DataError(f"{path}: the file is UTF-16 or UTF-32 (it starts with such a byte-order mark): "
                            "save it as UTF-8")
        handle.seek(0)
        for number, raw in _numbered_lines(handle):
            where = f"{path}:{number}"
            try:
                record = parse(raw, where)
            except DataError as error:
                if on_error is None:
                    raise
                errors += 1
                on_error(number, error)
                continue
            if record is not None:
                found += 1
                yield where, record
    if not found:
        raise DataError(f"{path}: the file has no examples" + (f" ({errors} invalid lines skipped)" if errors else ""))


def _numbered_lines(handle) -> Iterator[Tuple[int, Optional[bytes]]]:
    """(line number, bytes), or (line number, None) for a line over MAX_LINE_BYTES, which is skipped unread."""
    number = 0
    while True:
        raw = handle.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        number += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):
                raw = handle.readline(1 << 20)
            yield number, None
        else:
            yield number, raw


def _decode_line(raw: Optional[bytes], where: str) -> str:
    if raw is None:
        limit = f"{MAX_LINE_BYTES >> 20} MiB" if MAX_LINE_BYTES >= 1 << 20 else f"{MAX_LINE_BYTES} bytes"
        raise DataError(f"{where}: line longer than {limit}, not read "
                        "(expected JSON lines: one example per line)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{where}: not UTF-8 text ({error.reason} at byte {error.start}): save the file as UTF-8") from None


def _text_line(raw: Optional[bytes], where: str) -> Optional[str]:
    """The line without its line break, or None for a blank line."""
    line = _decode_line(raw, where).rstrip("\r\n")
    return line if line.strip() else None


def _parse_line(raw: Optional[bytes], where: str) -> Optional[dict]:
    """The line's JSON object, or None for a blank line."""
    line = _decode_line(raw, where)
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        hint = ": expected one JSON object per line, not one JSON document" if line.strip() in ("[", "{") else ""
        raise DataError(f"{where}: invalid JSON ({error.msg} at column {error.colno}){hint}") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object per line, got {type(record).__name__}")
    return record


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


def tokenize_pairs(pairs: List[TextPair], template, src_length: int, tgt_length: int) -> GLMDataset:
    """Training examples (for training and eval loss) and generation prompts for `pairs`, through the family's
    `template` (a `models.Template`): its prompt format and chat template, positions and masks."""
    dataset = GLMDataset(features=[])
    truncated_sources = truncated_targets = 0
    for pair in pairs:
        sample = Sample(*pair)
        prompt_ids, cut = template.prompt_ids(sample.source, sample.history, src_length)
        target_ids = template.target_ids(sample.target)
        truncated_sources += cut
        truncated_targets += len(target_ids) > tgt_length - 1
        dataset.features.append(template.training_example(prompt_ids, target_ids, tgt_length))
        dataset.prompts.append(template.generation_example(prompt_ids))
        dataset.sources.append(sample.source)
        dataset.targets.append(sample.target)
        dataset.references.append(template.response(target_ids[: tgt_length - 1]))
    if truncated_sources or truncated_targets:
        logger.warning(
            f"truncated {truncated_sources} of {len(pairs)} sources to --src_length {src_length} (dialogue history "
            f"first, then the end of the text) and {truncated_targets} targets to --tgt_length {tgt_length} "
            "(their end dropped)"
        )
    return dataset


def read_pairs(path: str, to_pairs: Callable[[dict, str], List[TextPair]], limit: Optional[int] = None,
               skipped: Optional[List[dict]] = None) -> List[TextPair]:
    """All (source, target) pairs of a JSON-lines file, through a task's record mapping.

    The first line that is no valid example raises its DataError (`file:line: ...`). Given a list `skipped`
    (`--skip_invalid_examples`), every such line is appended to it as {"file", "line", "reason"} instead and
    reading goes on; a file without a single valid example still raises.
    """
    def skip(number: int, error: DataError) -> None:
        prefix = f"{path}:{number}: "
        message = str(error)
        reason = message[len(prefix):] if message.startswith(prefix) else message
        skipped.append({"file": path, "line": number, "reason": reason})

    pairs: List[TextPair] = []
    for where, record in read_json_lines(path, on_error=None if skipped is None else skip):
        try:
            pairs.extend(to_pairs(record, where))
        except DataError as error:
            if skipped is None:
                raise
            skip(int(where.rsplit(":", 1)[1]), error)
            continue
        if limit is not None and len(pairs) >= limit:
            return pairs[:limit]
    if not pairs and skipped is not None:  # every record was skipped
        raise DataError(f"{path}: no valid examples: all {sum(s['file'] == path for s in skipped)} lines skipped")
    return pairs


def summarize_skipped(skipped: List[dict]) -> str:
    """'3 invalid JSON, 1 missing field 'question'': skipped lines counted by reason, details dropped."""
    counts = Counter(re.sub(r"\s*\([^()]*\)", "", item["reason"]) for item in skipped)
    return ", ".join(f"{count} {reason}" for reason, count in counts.most_common())
