"""Benchmark tasks as declarations, as lm-evaluation-harness declares them: data + prompt template + scoring rule.

A prompt is the subject's header, k solved examples ("shots", each followed by a blank line) and the item's
context; the model is scored on each choice's continuation text after it (`paddle_glm.scoring`). The choice with
the highest summed log-likelihood is the prediction (`acc`); `acc_norm` divides by the continuation's length in
characters first (lm-evaluation-harness's length normalisation; equal to `acc` when every continuation is one
letter).

- mmlu: MMLU's CSV, shots from dev. Header "The following are multiple choice questions (with answers) about
  {subject}.", item "{question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\nAnswer:", continuations " A", " B", " C", " D";
- ceval: C-Eval's CSV, shots from dev. Header "以下是中国关于{科目}考试的单项选择题，请选出其中的正确答案。", item
  "{question}\nA. {A}\n...\n答案：", continuations "A" ... "D";
- cmmlu: CMMLU's CSV, shots from dev. Header "以下是关于{科目}的单项选择题，请直接给出正确答案的选项。", item
  "题目：{question}\nA. {A}\n...\n答案是：", continuations "A" ... "D";
- copa: COPA's JSON lines, shots from train. No header, item "{premise without its final period} because" (cause)
  or "... therefore" (effect), continuations " {choice with its first letter lower-cased}";
- jsonl_choice: question/choices/answer JSON lines, shots from dev, as mmlu ("about {subject}" only with one).
Headers end with a blank line.

The headers and item formats are those of MMLU's `evaluate.py` (with lm-evaluation-harness's fix of its double space
after "about"), C-Eval's and CMMLU's own evaluation code and lm-evaluation-harness's COPA; questions are stripped as
the harness strips them.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .args import InputError
from .eval_data import (
    LETTERS, Item, read_copa, read_csv_subjects, read_headered_csv, read_jsonl_choice, read_jsonl_subjects, read_mmlu,
)
from .eval_subjects import CEVAL_SUBJECTS, CMMLU_SUBJECTS, MMLU_CATEGORIES

__all__ = ["EvalTask", "TASKS", "get_task", "prompt_text", "SHOT_SEPARATOR"]

SHOT_SEPARATOR = "\n\n"
Loader = Callable[[str, str, Optional[Sequence[str]]], Dict[str, List[Item]]]  # (data_dir, split, subjects)


@dataclass(frozen=True)
class EvalTask:
    """Where a benchmark's items come from, what the model reads and which continuations it is scored on."""

    name: str
    load: Loader
    header: Callable[[str], str]  # subject -> the text before the shots
    context: Callable[[Item], str]  # the item up to its answer
    continuations: Callable[[Item], List[str]]  # one text per choice, scored after the context
    default_split: str
    shot_split: str  # where shots come from (the first k items of the same subject)
    default_shots: int
    categories: Callable[[str], Tuple[str, ...]] = lambda subject: ()


def prompt_text(task: EvalTask, subject: str, shots: Sequence[Item], item: Item) -> str:
    """The header, the shots with their right answers, and the item's context."""
    solved = "".join(task.context(s) + task.continuations(s)[s.answer] + SHOT_SEPARATOR for s in shots)
    return task.header(subject) + solved + task.context(item)


def _options(item: Item) -> str:
    return "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, item.choices))


def _letters(item: Item, before: str = "") -> List[str]:
    return [before + letter for letter in LETTERS[: len(item.choices)]]


def _english_header(subject: str) -> str:
    about = f" about {subject.replace('_', ' ')}" if subject else ""
    return f"The following are multiple choice questions (with answers){about}.{SHOT_SEPARATOR}"


def _mmlu_category(subject: str) -> Tuple[str, ...]:
    return tuple(category for category, subjects in MMLU_CATEGORIES.items() if subject in subjects)


def _chinese_name(table: dict, subject: str) -> str:
    return table[subject][0] if subject in table else subject.replace("_", " ")


def _copa_context(item: Item) -> str:
    premise = item.question.strip()
    if premise[-1:] in ".!?。！？":
        premise = premise[:-1]  # the harness drops the final period
    return f"{premise} {'because' if item.relation == 'cause' else 'therefore'}"


def _mmlu_context(item: Item) -> str:
    return f"{item.question.strip()}{_options(item)}\nAnswer:"


TASKS: Dict[str, EvalTask] = {task.name: task for task in (
    EvalTask(
        name="mmlu", load=partial(read_csv_subjects, read=read_mmlu),
        header=_english_header, context=_mmlu_context, continuations=partial(_letters, before=" "),
        default_split="test", shot_split="dev", default_shots=5, categories=_mmlu_category,
    ),
    EvalTask(
        name="ceval", load=partial(read_csv_subjects, read=read_headered_csv),
        header=lambda s: f"以下是中国关于{_chinese_name(CEVAL_SUBJECTS, s)}考试的单项选择题，请选出其中的正确答案。\n\n",
        context=lambda item: f"{item.question.strip()}{_options(item)}\n答案：", continuations=_letters,
        default_split="val", shot_split="dev", default_shots=5,
        categories=lambda s: (CEVAL_SUBJECTS[s][1],) if s in CEVAL_SUBJECTS else (),
    ),
    EvalTask(
        name="cmmlu", load=partial(read_csv_subjects, read=read_headered_csv),
        header=lambda s: f"以下是关于{_chinese_name(CMMLU_SUBJECTS, s)}的单项选择题，请直接给出正确答案的选项。\n\n",
        context=lambda item: f"题目：{item.question.strip()}{_options(item)}\n答案是：", continuations=_letters,
        default_split="test", shot_split="dev", default_shots=5,
        categories=lambda s: CMMLU_SUBJECTS[s][1] if s in CMMLU_SUBJECTS else (),
    ),
    EvalTask(
        name="copa", load=partial(read_jsonl_subjects, read=read_copa),
        header=lambda subject: "", context=_copa_context,
        continuations=lambda item: [" " + choice[:1].lower() + choice[1:] for choice in item.choices],
        default_split="val", shot_split="train", default_shots=0,
    ),
    EvalTask(
        name="jsonl_choice", load=partial(read_jsonl_subjects, read=read_jsonl_choice),
        header=_english_header, context=_mmlu_context, continuations=partial(_letters, before=" "),
        default_split="test", shot_split="dev", default_shots=0,
    ),
)}


def get_task(name: str) -> EvalTask:
    if name not in TASKS:
        raise InputError(f"--task {name!r}: choose one of {', '.join(TASKS)}")
    return TASKS[name]
