"""Data sets by name, through PaddleNLP's `paddlenlp.datasets` (they download, so they need network).

The reference example's names keep working: DuReaderQG (`--task_name dureader_qg` without `--train_file`) and the
BELLE sets by name (`--task_name school_math_0.25M --data_name bellegroup`, and every other set PaddleNLP's
`bellegroup` data set knows). Local `--train_file`/`--dev_file` always take precedence; offline, a failed download
ends in one line naming the download and the flags to use instead (PaddleNLP's own error is a
`RuntimeError: Download from ... failed. Retry limit reached` traceback).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from .args import InputError

__all__ = ["BELLE_SETS", "NamedDataSet", "named_data_set", "load_named_pairs"]

# PaddleNLP's split names for our dev split.
_SPLITS = {"train": "train", "dev": "dev"}


def _belle_sets() -> Tuple[str, ...]:
    from paddlenlp.datasets.bellegroup import BelleGroup

    return tuple(BelleGroup.BUILDER_CONFIGS)


BELLE_SETS = _belle_sets()


@dataclass(frozen=True)
class NamedDataSet:
    """A `paddlenlp.datasets` data set: its name and, for sets with several configurations, which one."""

    name: str
    config: Optional[str] = None

    @property
    def label(self) -> str:
        return self.name if self.config is None else f"{self.name}/{self.config}"

    def url(self, split: str) -> str:
        """Where PaddleNLP downloads `split` from (for error messages)."""
        if self.name == "bellegroup":
            from paddlenlp.datasets.bellegroup import BelleGroup

            return BelleGroup.BUILDER_CONFIGS[self.config]["url"]
        from paddlenlp.datasets.dureader_qg import DuReaderQG

        return DuReaderQG.SPLITS[_SPLITS[split]].URL


def named_data_set(task_name: str, data_name: Optional[str]) -> Optional[NamedDataSet]:
    """The downloadable data set that `--task_name`/`--data_name` name, or None when they name none."""
    if task_name in BELLE_SETS:
        if data_name not in (None, "bellegroup"):
            raise InputError(f"--data_name {data_name}: {task_name} is a BELLE set, PaddleNLP's 'bellegroup'")
        return NamedDataSet("bellegroup", task_name)
    if data_name == "bellegroup":
        raise InputError(f"--data_name bellegroup needs a BELLE set as --task_name: one of {', '.join(BELLE_SETS)}")
    if data_name not in (None, task_name):
        raise InputError(f"--data_name {data_name}: not a data set this toolkit downloads (dureader_qg, bellegroup); "
                         "give local JSON lines with --train_file/--dev_file")
    return NamedDataSet("dureader_qg") if task_name == "dureader_qg" else None


def load_named_pairs(data_set: NamedDataSet, split: str, to_pairs, limit: Optional[int]) -> List[Tuple[str, str]]:
    """The (source, target) pairs of `split` ('train' or 'dev'), each record through the task's `to_pairs`."""
    from paddlenlp.datasets import load_dataset

    try:
        records = load_dataset(data_set.name, name=data_set.config, splits=[_SPLITS[split]])
    except (RuntimeError, OSError) as error:  # paddle's downloader: RuntimeError after its retries; OSError, network
        raise InputError(
            f"could not download the {split} split of {data_set.label} from {data_set.url(split)} ({_first_line(error)}); "
            f"without network, give local JSON lines with --train_file and --dev_file") from None
    pairs = []
    for index, record in enumerate(records):
        pairs += to_pairs(record, f"{data_set.label}[{split}][{index}]")
        if limit and len(pairs) >= limit:
            return pairs[:limit]
    return pairs


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
