"""One small module per fine-tuning task, chosen by `--task_name`.

Every task module exposes the same two things:
- `to_pairs(record, where, args) -> list[(source, target)]`: one JSON record to text pairs
  (`where` is `file:line`, for error messages; `args` are the data arguments);
- `DEFAULTS`: the data and decoding defaults that suit the task.
"""
from __future__ import annotations

from types import ModuleType

from paddle_glm.args import InputError
from paddle_glm.named_data import BELLE_SETS

from . import adgen, belle, dureader_qg, jsonl

TASKS = {module.NAME: module for module in (dureader_qg, belle, jsonl, adgen)}


def get_task(name: str) -> ModuleType:
    """The task module `--task_name` names; a BELLE set's name (the reference's `--task_name school_math_0.25M`)
    is the belle task."""
    if name in BELLE_SETS:
        return belle
    if name not in TASKS:
        raise InputError(f"--task_name {name!r} is not a known task: choose one of {', '.join(sorted(TASKS))}")
    return TASKS[name]
