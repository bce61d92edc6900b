"""Benchmark data from local files in the layouts the data sets are published in, with `file:line: field` errors.

- MMLU (hendrycks/test `data.tar`): `{split}/{subject}_{split}.csv`, no header, rows `question, A, B, C, D, answer`;
- C-Eval (`ceval-exam.zip`): `{split}/{subject}_{split}.csv` with a header `id,question,A,B,C,D,answer[,explanation]`
  (the test split has no answers);
- CMMLU (`cmmlu_v1_0_1.zip`): `{split}/{subject}.csv` with a header `,Question,A,B,C,D,Answer`;
- COPA (SuperGLUE `COPA.zip`): `{split}.jsonl`, records `premise, choice1, choice2, question (cause|effect), label`;
- any multiple-choice set (`jsonl_choice`): `{split}.jsonl`, records `question, choices (list), answer (index or
  letter)[, subject]`.

CSV files are read with the `csv` module, never pandas: MMLU holds options such as "None" that pandas reads as NaN.
Line numbers are those where a record starts (a quoted field may span lines).
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from .data import DataError, read_json_lines, text_field

__all__ = ["Item", "LETTERS", "read_csv_subjects", "read_jsonl_subjects", "read_mmlu", "read_headered_csv", "read_copa",
           "read_jsonl_choice"]

LETTERS = "ABCDEFGHIJ"
MC_COLUMNS = ("question", "A", "B", "C", "D", "answer")


@dataclass(frozen=True)
class Item:
    """One question: its options' texts and the index of the right one."""

    subject: str
    where: str  # file:line of its record
    question: str  # the question, or COPA's premise
    choices: Tuple[str, ...]
    answer: int
    relation: str = ""  # COPA: "cause" or "effect"


def select_subjects(files: Dict[str, str], subjects: Optional[Sequence[str]], where: str) -> Dict[str, str]:
    """The files of `--subjects` (all when None), refusing names that have no file."""
    if not files:
        raise DataError(f"{where}: no data files")
    if not subjects:
        return dict(sorted(files.items()))
    unknown = [s for s in subjects if s not in files]
    if unknown:
        raise DataError(f"{where}: no subject {', '.join(unknown)} (it has {', '.join(sorted(files)[:12])}"
                        f"{', ...' if len(files) > 12 else ''})")
    return {s: files[s] for s in subjects}


def subject_files(directory: str, split: str) -> Dict[str, str]:
    """subject -> CSV file of a split directory: `{subject}_{split}.csv` (MMLU, C-Eval) or `{subject}.csv` (CMMLU)."""
    if not os.path.isdir(directory):
        raise DataError(f"{directory}: no such directory")
    files = {}
    for name in os.listdir(directory):
        if name.endswith(".csv"):
            stem = name[:-4]
            files[stem[: -len(split) - 1] if stem.endswith(f"_{split}") else stem] = os.path.join(directory, name)
    return files


def read_csv_subjects(data_dir: str, split: str, subjects: Optional[Sequence[str]],
                      read: Callable[[str, str], List[Item]]) -> Dict[str, List[Item]]:
    """Every selected subject's items from its file in `{data_dir}/{split}/`."""
    directory = os.path.join(data_dir, split)
    files = select_subjects(subject_files(directory, split), subjects, directory)
    return {subject: read(path, subject) for subject, path in files.items()}


def read_jsonl_subjects(data_dir: str, split: str, subjects: Optional[Sequence[str]],
                        read: Callable[[str], List[Item]]) -> Dict[str, List[Item]]:
    """The items of `{data_dir}/{split}.jsonl` by subject, in file order."""
    path = os.path.join(data_dir, f"{split}.jsonl")
    by_subject: Dict[str, List[Item]] = {}
    for item in read(path):
        by_subject.setdefault(item.subject, []).append(item)
    return {s: by_subject[s] for s in select_subjects({s: path for s in by_subject}, subjects, path)}


def _csv_rows(path: str) -> Iterator[Tuple[int, List[str]]]:
    """(line where the record starts, fields) of every non-empty record."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such data file")
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({error.reason}): save the file as UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    line = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            raise DataError(f"{path}:{line}: not a valid CSV record ({error})") from None
        if row:
            yield line, row
        line = reader.line_num + 1


def multiple_choice_item(subject: str, where: str, question: str, choices: Sequence[str], answer: str) -> Item:
    """An item whose `answer` is a letter (A, B, ...) among `choices`."""
    if not question.strip():
        raise DataError(f"{where}: field 'question' is empty")
    letters = LETTERS[: len(choices)]
    letter = answer.strip()
    if len(letter) != 1 or letter not in letters:
        raise DataError(f"{where}: field 'answer' is {answer!r}, not one of {', '.join(letters)}")
    return Item(subject, where, question, tuple(choices), letters.index(letter))


def read_mmlu(path: str, subject: str) -> List[Item]:
    """MMLU's header-less CSV: question, A, B, C, D, answer."""
    items = []
    for line, row in _csv_rows(path):
        where = f"{path}:{line}"
        if len(row) != len(MC_COLUMNS):
            raise DataError(f"{where}: expected {len(MC_COLUMNS)} fields ({', '.join(MC_COLUMNS)}), got {len(row)}")
        items.append(multiple_choice_item(subject, where, row[0], row[1:5], row[5]))
    return _non_empty(items, path)


def read_headered_csv(path: str, subject: str) -> List[Item]:
    """C-Eval's and CMMLU's CSV: a header naming question, A-D and answer (any case; other columns ignored)."""
    rows = _csv_rows(path)
    first = next(rows, None)
    if first is None:
        raise DataError(f"{path}: the file has no examples")
    header = [name.strip().lower() for name in first[1]]
    missing = [name for name in MC_COLUMNS if name.lower() not in header]
    if missing == ["answer"]:
        raise DataError(f"{path}:{first[0]}: no 'answer' column (C-Eval's test answers are not published: evaluate "
                        "--split val)")
    if missing:
        raise DataError(f"{path}:{first[0]}: the header lacks {', '.join(repr(m) for m in missing)} (expected "
                        f"id,{','.join(MC_COLUMNS)})")
    index = [header.index(name.lower()) for name in MC_COLUMNS]
    items = []
    for line, row in rows:
        where = f"{path}:{line}"
        if len(row) != len(header):
            raise DataError(f"{where}: expected {len(header)} fields as the header, got {len(row)}")
        question, *choices, answer = (row[i] for i in index)
        items.append(multiple_choice_item(subject, where, question, choices, answer))
    return _non_empty(items, path)


def _non_empty(items: List[Item], path: str) -> List[Item]:
    if not items:
        raise DataError(f"{path}: the file has no examples")
    return items


def read_copa(path: str) -> List[Item]:
    """SuperGLUE COPA JSON lines."""
    items = []
    for where, record in read_json_lines(path):
        relation = text_field(record, ("question",), where)
        if relation not in ("cause", "effect"):
            raise DataError(f"{where}: field 'question' is {relation!r}, not 'cause' or 'effect'")
        label = record.get("label")
        if label not in (0, 1) or isinstance(label, bool):
            raise DataError(f"{where}: field 'label' is {label!r}, not 0 or 1" if "label" in record
                            else f"{where}: missing field 'label' (0 or 1; COPA's test split has none)")
        choices = tuple(text_field(record, (name,), where) for name in ("choice1", "choice2"))
        items.append(Item("copa", where, text_field(record, ("premise",), where), choices, label, relation))
    return items


def read_jsonl_choice(path: str) -> List[Item]:
    """Generic multiple choice JSON lines: question, choices (2 to 10 strings), answer (0-based index or letter)."""
    items = []
    for where, record in read_json_lines(path):
        question = text_field(record, ("question",), where)
        choices = record.get("choices")
        if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS) or not all(
                isinstance(c, str) for c in choices):
            raise DataError(f"{where}: field 'choices' must be a list of 2 to {len(LETTERS)} strings")
        answer = record.get("answer")
        if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
            answer = LETTERS[answer]
        if not isinstance(answer, str):
            raise DataError(f"{where}: field 'answer' is {answer!r}, not a choice's index (0-based) or letter")
        subject = text_field(record, ("subject",), where) if "subject" in record else ""
        items.append(multiple_choice_item(subject, where, question, choices, answer))
    return items
