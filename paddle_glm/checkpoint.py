"""Merge tensor-parallel shards into one checkpoint, or split one into N shards, in a single process.

    python -m paddle_glm.checkpoint merge SHARDED_DIR MERGED_DIR
    python -m paddle_glm.checkpoint split MERGED_DIR SHARDED_DIR --tensor_parallel_degree 2

Shards are PaddleNLP's `model_state.tpXX.pdparams`, cut by the rules of the checkpoint's family (its model class's
`_get_tensor_parallel_mappings`: GLM's and ChatGLM-6B's are PaddleNLP's, per-head QKV; ChatGLM2/3's [Q | K | V]
blocks with K/V groups split or replicated), so PaddleNLP's checkpoints and ours work in either. No process group is needed, and tensors move one at a
time: a merge holds the shards (one copy of the weights) plus the tensor being joined; a split holds
the whole checkpoint plus one shard.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
from typing import Callable, Dict, List, Optional

import numpy as np
import paddle
from .logs import configure as configure_logs, logger
from tqdm import tqdm

from .args import VERBOSE_HELP, exit_on_bad_input
from .models import Family, family_of

__all__ = ["merge_shards", "split_checkpoint", "shard_files", "main"]

WEIGHTS = "model_state.pdparams"
SHARD = re.compile(r"model_state\.tp(\d\d)\.pdparams$")
# Files a checkpoint directory holds besides the tokenizer's (copied as they are).
_WEIGHTS = re.compile(r"^(model_state.*\.pdparams|model.*\.safetensors|.*\.index\.json|config\.json)$")


def shard_files(directory: str) -> List[str]:
    """The tensor-parallel shard files of `directory`, rank order; checks none is missing."""
    files = sorted(glob.glob(os.path.join(directory, "model_state.tp*.pdparams")))
    ranks = [int(SHARD.search(f).group(1)) for f in files if SHARD.search(f)]
    if not ranks:
        raise FileNotFoundError(f"{directory}: no model_state.tpXX.pdparams shards")
    if ranks != list(range(len(ranks))):
        raise ValueError(f"{directory}: shards {ranks} are not 0..{len(ranks) - 1}; a shard is missing")
    return files


def _actions(family: Family, config, degree: int, rank: int, is_split: bool) -> Dict[str, Callable]:
    config.tensor_parallel_degree, config.tensor_parallel_rank = degree, rank
    return family.model_class._get_tensor_parallel_mappings(config, is_split=is_split)


def _action_for(family: Family, actions: Dict[str, Callable], key: str) -> Optional[Callable]:
    """Mapping keys are relative to the base model (`transformer...`); state keys carry its prefix (`glm.`)."""
    prefix = family.model_class.base_model_prefix + "."
    return actions.get(key[len(prefix):] if key.startswith(prefix) else key)


def merge_shards(source: str, target: str) -> None:
    """Join `source`'s shards into `target/model_state.pdparams` (+ config with degree 1, tokenizer files)."""
    files = shard_files(source)
    family = family_of(source)
    config = family.config_class.from_pretrained(source)
    if int(getattr(config, "tensor_parallel_degree", len(files))) not in (len(files), 1, -1):
        raise ValueError(f"{source}: config.json says tensor_parallel_degree {config.tensor_parallel_degree} "
                         f"but there are {len(files)} shards")
    shards = [paddle.load(path, return_numpy=True) for path in tqdm(files, desc="reading shards")]
    _check_same_keys(shards, files)
    actions = _actions(family, config, len(files), 0, is_split=False)
    merged = {}
    for key in tqdm(list(shards[0]), desc="merging"):
        parts = [shard.pop(key) for shard in shards]
        action = _action_for(family, actions, key)
        merged[key] = action(parts) if action else parts[0]
    _write(target, merged, config, degree=1, rank=0, source=source)


def split_checkpoint(source: str, target: str, degree: int) -> None:
    """Cut `source/model_state.pdparams` into `degree` shards `target/model_state.tpXX.pdparams`."""
    path = os.path.join(source, WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found (to merge shards use `merge`)")
    family = family_of(source)
    config = family.config_class.from_pretrained(source)
    problems = family.tensor_parallel_problems(config, degree)
    if problems:
        raise ValueError("; ".join(problems))
    full = paddle.load(path, return_numpy=True)
    for rank in tqdm(range(degree), desc="splitting"):
        actions = _actions(family, config, degree, rank, is_split=True)
        shard = {key: (_action_for(family, actions, key) or (lambda x: x))(value) for key, value in full.items()}
        _write(target, shard, config, degree=degree, rank=rank, source=source)


def _check_same_keys(shards: List[dict], files: List[str]) -> None:
    for shard, path in zip(shards[1:], files[1:]):
        if set(shard) != set(shards[0]):
            difference = sorted(set(shard) ^ set(shards[0]))[:5]
            raise ValueError(f"{path} and {files[0]} hold different tensors (e.g. {difference}): not one checkpoint")


def _write(target: str, state: Dict[str, np.ndarray], config, degree: int, rank: int, source: str) -> None:
    os.makedirs(target, exist_ok=True)
    name = WEIGHTS if degree == 1 else f"model_state.tp{rank:02d}.pdparams"
    temporary = os.path.join(target, f".{name}.tmp")
    paddle.save({key: paddle.to_tensor(value) for key, value in state.items()}, temporary)
    os.replace(temporary, os.path.join(target, name))  # never a half-written weights file
    if rank == 0:
        config.tensor_parallel_degree, config.tensor_parallel_rank = degree, 0
        config.save_pretrained(target)
        for side in sorted(os.listdir(source)):  # the tokenizer's files
            path = os.path.join(source, side)
            if os.path.isfile(path) and not _WEIGHTS.match(side) and os.path.abspath(source) != os.path.abspath(target):
                shutil.copy(path, os.path.join(target, side))
    logger.info(f"wrote {os.path.join(target, name)}")


@exit_on_bad_input
def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m paddle_glm.checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser("merge", help="join model_state.tpXX.pdparams shards into one checkpoint")
    merge.add_argument("source", help="directory with the shards and config.json")
    merge.add_argument("target", help="directory to write model_state.pdparams, config.json and tokenizer files to")
    split = commands.add_parser("split", help="cut one checkpoint into tensor-parallel shards")
    split.add_argument("source", help="directory with model_state.pdparams and config.json")
    split.add_argument("target", help="directory to write the shards, config.json and tokenizer files to")
    split.add_argument("--tensor_parallel_degree", type=int, required=True, help="number of shards")
    for command in (merge, split):
        command.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    configure_logs(argv)
    args = parser.parse_args(argv)
    paddle.set_device("cpu")
    if args.command == "merge":
        merge_shards(args.source, args.target)
    else:
        split_checkpoint(args.source, args.target, args.tensor_parallel_degree)


if __name__ == "__main__":
    main()
