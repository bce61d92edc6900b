"""Benchmark results: per item, per subject, per category and overall; the printed table and the files.

Accuracies are percentages rounded to 2 decimals. A category's and the overall `micro` accuracy counts items (MMLU's
`evaluate.py` reports categories so), `macro` averages the subjects' accuracies (C-Eval's and CMMLU's averages).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np

from .data import write_json_lines
from .eval_data import Item

__all__ = ["ItemResult", "summarize", "print_table", "write_results", "predictions_path"]


@dataclass
class ItemResult:
    """One item's scores: a log-likelihood per choice, and the continuations' lengths in characters (acc_norm)."""

    subject: str
    where: str
    answer: int
    loglikelihoods: List[float]
    lengths: List[int]
    shots: int
    cut: bool
    prompt_tokens: int

    @classmethod
    def of(cls, item: Item, encoded, loglikelihoods: List[float], lengths: List[int]) -> "ItemResult":
        return cls(item.subject, item.where, item.answer, loglikelihoods, lengths, encoded.shots, encoded.cut,
                   len(encoded.prompt_ids))

    @property
    def prediction(self) -> int:
        return int(np.argmax(self.loglikelihoods))

    @property
    def prediction_norm(self) -> int:
        return int(np.argmax(np.array(self.loglikelihoods) / np.array(self.lengths)))

    def record(self) -> dict:
        return {"subject": self.subject, "where": self.where, "answer": self.answer, "prediction": self.prediction,
                "prediction_norm": self.prediction_norm, "correct": self.prediction == self.answer,
                "loglikelihoods": self.loglikelihoods, "shots": self.shots,
                "cut": self.cut, "prompt_tokens": self.prompt_tokens}


def _percent(values: Sequence[float]) -> float:
    return round(100.0 * float(np.mean(values)), 2)


def _scores(results: List[ItemResult]) -> Dict[str, float]:
    return {"items": len(results), "acc": _percent([r.prediction == r.answer for r in results]),
            "acc_norm": _percent([r.prediction_norm == r.answer for r in results])}


def _group(name_results: Dict[str, List[ItemResult]], subjects: Dict[str, dict]) -> dict:
    """Micro (items) and macro (subjects) accuracies of a set of subjects."""
    results = [r for group in name_results.values() for r in group]
    micro = _scores(results)
    return {"subjects": len(name_results), "items": micro["items"], "acc_micro": micro["acc"],
            "acc_macro": round(float(np.mean([subjects[s]["acc"] for s in name_results])), 2),
            "acc_norm_micro": micro["acc_norm"],
            "acc_norm_macro": round(float(np.mean([subjects[s]["acc_norm"] for s in name_results])), 2)}


def summarize(task, results: List[ItemResult], meta: dict) -> dict:
    """The summary written to --output_file: `meta`, subjects, categories, overall, how many prompts were cut."""
    by_subject: Dict[str, List[ItemResult]] = {}
    for result in results:
        by_subject.setdefault(result.subject, []).append(result)
    subjects = {s: {**_scores(group), "categories": list(task.categories(s))} for s, group in by_subject.items()}
    names = sorted({c for s in by_subject for c in task.categories(s)})
    categories = {c: _group({s: g for s, g in by_subject.items() if c in task.categories(s)}, subjects) for c in names}
    requested = meta.get("shots", 0)
    return {**meta, "overall": _group(by_subject, subjects), "categories": categories, "subjects": subjects,
            "truncated": {"items_with_fewer_shots": sum(r.shots < requested for r in results),
                          "items_cut": sum(r.cut for r in results)}}


def print_table(summary: dict) -> None:
    """Subjects, categories (micro and macro) and overall, with the run's speed."""
    width = max([len(name) for name in summary["subjects"]] + [len(c) + 8 for c in summary["categories"]] + [16])
    print(f"\n{summary['task']} ({summary['split']}, {summary['shots']}-shot, chat template "
          f"{summary['chat_template']}): {summary['overall']['items']} items in {summary['seconds']} s "
          f"({summary['items_per_second']} items/s)")
    print(f"{'subject':<{width}} {'items':>6} {'acc':>7} {'acc_norm':>9}")
    rows = [(name or "(no subject)", values["items"], values["acc"], values["acc_norm"])
            for name, values in summary["subjects"].items()]
    for name, values in [*summary["categories"].items(), ("overall", summary["overall"])]:
        rows.append((f"{name} (micro)", values["items"], values["acc_micro"], values["acc_norm_micro"]))
        rows.append((f"{name} (macro)", values["items"], values["acc_macro"], values["acc_norm_macro"]))
    for name, items, acc, acc_norm in rows:
        print(f"{name:<{width}} {items:>6} {acc:>7.2f} {acc_norm:>9.2f}")
    truncated = summary["truncated"]
    if truncated["items_with_fewer_shots"] or truncated["items_cut"]:
        print(f"{truncated['items_with_fewer_shots']} items kept fewer shots to fit --max_length, "
              f"{truncated['items_cut']} lost the beginning of their prompt")


def predictions_path(output_file: str) -> str:
    stem = output_file[:-5] if output_file.endswith(".json") else output_file
    return f"{stem}.predictions.jsonl"


def write_results(summary: dict, results: List[ItemResult], output_file: str) -> None:
    directory = os.path.dirname(os.path.abspath(output_file))
    os.makedirs(directory, exist_ok=True)
    with open(output_file, "w", encoding="utf-8") as handle:
        json.dump(summary, handle, ensure_ascii=False, indent=2)
    write_json_lines((r.record() for r in results), predictions_path(output_file))
    print(f"results written to {output_file} and {predictions_path(output_file)}")
