"""Convert checkpoints of every family between THUDM's PyTorch layouts and ours (PaddleNLP's).

    python -m paddle_glm.convert --from hf chatglm3-6b/ checkpoints/chatglm3-6b       # ChatGLM2-6B, ChatGLM3-6B
    python -m paddle_glm.convert --from hf chatglm-6b/ checkpoints/chatglm-6b         # ChatGLM-6B
    python -m paddle_glm.convert --from hf glm-large-chinese/ checkpoints/glm-large-zh
    python -m paddle_glm.convert --from thudm --preset glm-large-chinese CKPT_DIR OUT_DIR
    python -m paddle_glm.convert --from paddle --to hf OUR_CHECKPOINT OUT_DIR
    python -m paddle_glm.convert --from hf --tensor_parallel_degree 2 SRC OUT_DIR

The family comes from config.json (`paddle_glm.models.family_of`: THUDM's Hugging Face configs say model_type
"chatglm" for ChatGLM-6B, ChatGLM2 and ChatGLM3 alike, their fields tell them apart); what its files look like is
its `Release` (`Family.release`, in the family's module; the base in paddle_glm/models/release.py). The layouts:
- hf: THUDM's Hugging Face releases: config.json with pytorch_model.bin or model.safetensors, single or sharded
  with an index (`pytorch_model-00001-of-00008.bin` ... + `pytorch_model.bin.index.json`), names under the
  release's wrapper (`transformer.`, GLM's `glm.`) or without it (a base model saved alone: both read), Linear
  weights torch's [out, in]. THUDM's quantized releases (chatglm-6b-int4, chatglm2-6b-int4, ...) are refused.
- thudm (GLM): training checkpoints of github.com/THUDM/GLM. `DIR/latest_checkpointed_iteration.txt` names the
  folder `DIR/<iteration>/` of `mp_rank_XX_model_states.pt` files, one per model-parallel rank, each with its state
  dict under "module" and its slice of every parallel tensor (`mpu/layers.py`; see paddle_glm.models.glm.GLM_TENSORS). No
  config: `--preset` or the shape flags give what the tensors do not show.
- paddle: ours and PaddleNLP's: config.json (PaddleNLP's config class) and `model.safetensors` or
  `model_state.pdparams` (single or sharded with an index), Linear weights [in, out].
  `--tensor_parallel_degree N` writes PaddleNLP's tensor-parallel shards (`model.tp0X.safetensors` or
  `model_state.tp0X.pdparams`), split by the model's own rules so that PaddleNLP's loaders and ours read them.
The tokenizer (the family's sentencepiece model next to SRC, or --spm) is written as the family loads it, or
for --to hf as THUDM's release names it.

Memory: sources are read one weights file at a time (PyTorch files memory-mapped, each closed before the next
opens), and tensors go into output files cut at `--max_shard_size` as `save_pretrained` cuts them. The peak is
about one output shard (per tensor-parallel rank) plus one source file, not the model (measured in
tests/test_convert_chatglm.py). (THUDM's training checkpoints are the exception: every rank file holds a slice
of every tensor, so they are read together.)

Safety: `.pt`/`.bin` are read with `torch.load(weights_only=True)`. The non-tensor objects THUDM checkpoints
pickle beside the weights (argparse Namespaces, numpy RNG states, DeepSpeed bookkeeping) come back as inert
placeholders: no class or function named in the file ever runs (`_torch_load`). `.pdparams` are pickles read
by `paddle.load`: convert only those you trust. Safetensors need neither PyTorch nor trust.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
import zipfile
from collections import defaultdict
from functools import partial
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import paddle
from paddlenlp.transformers.utils import convert_file_size_to_int
from tqdm import tqdm

from .args import VERBOSE_HELP
from .logs import configure as configure_logs, logger
from .models import Family, family_of
from .models.glm import FAMILY as GLM, PRESETS, SHAPE_FLAGS, THUDM_EMBEDDING_COPIES
from .models.release import COLS, SAME, Release, TensorSpec, merge_model_parallel

__all__ = ["ConversionError", "convert", "main"]

# What wraps a model's names in THUDM's training checkpoints: its FP16_Module `module.`, its task models `model.`.
WRAPPER_PREFIXES = ("module.", "model.")
QUANTIZED = "_scale"  # THUDM's quantized releases keep a `weight_scale` beside each int8/int4 weight
QUANTIZED_ADVICE = ("THUDM's quantized releases (chatglm-6b-int4/-int8, chatglm2-6b-int4, ...) hold int8/int4 weights "
                    "with *_scale tensors, which our models do not run: convert the float16 release (e.g. "
                    "THUDM/chatglm2-6b) instead")

# (weights file, index of its shards) per layout and format, as PaddleNLP 2.8 and transformers name them.
WEIGHT_FILES = {
    ("paddle", "safetensors"): ("model.safetensors", "model.safetensors.index.json"),
    ("paddle", "pdparams"): ("model_state.pdparams", "model_state.pdparams.index.json"),
    ("hf", "safetensors"): ("model.safetensors", "model.safetensors.index.json"),
    ("hf", "bin"): ("pytorch_model.bin", "pytorch_model.bin.index.json"),
}
_WEIGHTS_OR_INDEX = re.compile(r"(model|model_state|pytorch_model)\b.*\.(safetensors|pdparams|bin|json)$")

Getters = Dict[str, Callable[[], np.ndarray]]  # tensor name -> reads it
Tensors = Iterator[Tuple[TensorSpec, np.ndarray]]


class ConversionError(Exception):
    """A checkpoint that cannot be converted as asked; the message names the file and the tensor."""


# ------------------------------------------------------------------------------------------ file access

def _torch():
    try:
        import torch
    except ImportError:
        raise ConversionError("PyTorch .pt/.bin files need PyTorch: pip install 'paddle-glm[convert]'") from None
    return torch


class _Opaque:
    """Stands in for every non-tensor object of a PyTorch checkpoint: keeps nothing, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _torch_load(path: str) -> Any:
    """`torch.load(weights_only=True)` that reads the checkpoint's non-tensor objects as `_Opaque`.

    A THUDM checkpoint pickles argparse Namespaces, numpy RNG states and DeepSpeed objects beside the weights,
    which a weights-only load refuses, one global at a time. Allow-listing each refused global *as `_Opaque`*
    (never as the real class or function) reads the tensors while running no code named by the file; globals of
    modules torch blocks (os, subprocess, ...) stay refused, and so does the file.
    """
    torch = _torch()
    placeholders: List[str] = []
    while True:
        try:
            with torch.serialization.safe_globals([(_Opaque, name) for name in placeholders]):
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except pickle.UnpicklingError as exc:
            lines = [line.strip() for line in str(exc).splitlines() if "GLOBAL" in line] or [str(exc).strip()]
            refused = re.search(r"GLOBAL ([\w.]+)", lines[0])
            if refused is None or refused.group(1) in placeholders:
                raise ConversionError(f"{path}: refused, it pickles what a weights-only load may not create "
                                      f"({lines[0]})") from None
            placeholders.append(refused.group(1))
            continue
        if placeholders:
            logger.info(f"{path}: read {', '.join(placeholders)} as placeholders")
        return state


def _torch_to_numpy(tensor: Any) -> np.ndarray:
    if str(tensor.dtype) == "torch.bfloat16":  # numpy has no bfloat16: widen, exactly
        tensor = tensor.float()
    return tensor.detach().cpu().numpy()


def _safetensors_getters(path: str) -> Getters:
    from safetensors import safe_open

    handle = safe_open(path, framework="np")

    def get(key: str) -> np.ndarray:
        if handle.get_slice(key).get_dtype() == "BF16":  # numpy cannot hold it: widen through torch
            _torch()
            with safe_open(path, framework="pt") as widened:
                return _torch_to_numpy(widened.get_tensor(key))
        return handle.get_tensor(key)

    return {key: partial(get, key) for key in handle.keys()}


def open_weights(path: str, state_key: Optional[str] = None) -> Getters:
    """A lazy reader per tensor of one weights file (.safetensors, .pdparams, or .pt/.bin [under state_key]),
    by the names the file stores."""
    try:
        if path.endswith(".safetensors"):
            getters = _safetensors_getters(path)
        elif path.endswith(".pdparams"):
            state = paddle.load(path, return_numpy=True)
            getters = {key: partial(np.asarray, value) for key, value in state.items()}
        else:
            state = _torch_load(path)
            if state_key is not None:
                if not isinstance(state, dict) or state_key not in state:
                    found = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
                    raise ConversionError(f"{path}: no '{state_key}' entry, where THUDM checkpoints keep their "
                                          f"weights (found {found})")
                state = state[state_key]
            getters = {key: partial(_torch_to_numpy, value) for key, value in state.items() if hasattr(value, "dtype")}
    except ConversionError:
        raise
    except Exception as exc:
        first_line = (str(exc).splitlines() or [""])[0]
        raise ConversionError(f"{path}: unreadable, is it complete? ({type(exc).__name__}: {first_line})") from exc
    return getters


def _read(getters: Getters, name: str, path: str) -> np.ndarray:
    try:
        return getters[name]()
    except Exception as exc:
        raise ConversionError(f"{path}: tensor {name}: unreadable ({type(exc).__name__}: {exc})") from exc


def _weights_in_directory(directory: str, candidates: Sequence[Tuple[str, str]]) -> Tuple[List[str], Dict[str, str]]:
    """The weights files of a checkpoint directory and, when an index lists them, which file holds each tensor."""
    for single, index in candidates:
        if os.path.isfile(os.path.join(directory, index)):
            with open(os.path.join(directory, index), encoding="utf-8") as handle:
                stored = json.load(handle)["weight_map"]
            weight_map = {key: os.path.join(directory, name) for key, name in stored.items()}
            return sorted(set(weight_map.values())), weight_map
        if os.path.isfile(os.path.join(directory, single)):
            return [os.path.join(directory, single)], {}
    looked_for = ", ".join(name for pair in candidates for name in pair)
    shards = [name for name in os.listdir(directory) if ".tp0" in name] if os.path.isdir(directory) else []
    hint = f"; {', '.join(sorted(shards))} are tensor-parallel shards: merge them first" if shards else ""
    raise ConversionError(f"{directory}: no weights (looked for {looked_for}){hint}")


# ------------------------------------------------------------------------------------------------ names

def _wrapper(names: Iterable[str]) -> str:
    """The first name component every name shares (`transformer.`, `glm.`), or ''."""
    heads = {name.split(".", 1)[0] + "." for name in names}
    return heads.pop() if len(heads) == 1 else ""


def match_names(keys: Iterable[str], expected: Iterable[str], wrapper: str) -> Tuple[Dict[str, str], List[str]]:
    """(expected name -> the stored key that holds it, stored keys that match none). A stored key may lack the
    release's `wrapper` (a base model saved alone) or carry a training wrapper (`module.`, `model.`)."""
    expected = set(expected)
    found: Dict[str, str] = {}
    left = []
    for key in keys:
        unwrapped = [key[len(prefix):] for prefix in WRAPPER_PREFIXES if key.startswith(prefix)]
        candidates = [key, wrapper + key] + unwrapped + [wrapper + name for name in unwrapped]
        name = next((candidate for candidate in candidates if candidate in expected), None)
        if name is None:
            left.append(key)
        else:
            found[name] = key
    return found, left


def _check_names(release: Release, config: Any, found: Dict[str, str], left: Sequence[str], names: Sequence[str],
                 origin: str) -> None:
    """Refuse quantized weights, missing tensors and tensors our model has no place for, naming them."""
    quantized = sorted(key for key in list(found.values()) + list(left) if key.endswith(QUANTIZED))
    if quantized:
        raise ConversionError(f"{origin}: quantized weights ({quantized[0]}, ...): {QUANTIZED_ADVICE}")
    missing = [name for name in names if name not in found]
    shape = f"a {config.num_hidden_layers}-layer {release.model_class.__name__}"
    if missing:
        raise ConversionError(f"{origin}: missing tensor(s) of {shape}: {', '.join(missing[:8])}"
                              + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    if left:
        raise ConversionError(f"{origin}: tensor(s) not part of {shape}: {', '.join(sorted(left)[:8])} "
                              "(a task head or prompt encoder, or more layers than the config says?)")


def _refuse_quantized(config: Dict[str, Any], origin: str) -> None:
    if config.get("quantization_bit"):
        raise ConversionError(f"{origin}: quantization_bit {config['quantization_bit']}: {QUANTIZED_ADVICE}")


def _describe(config: Any) -> str:
    return ", ".join(f"{name}={getattr(config, name)}"
                     for name in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size"))


# ---------------------------------------------------------------------------------------------- sources

class Source:
    """A checkpoint opened for conversion: its family, release and config, its tensors read on demand."""

    torch_layout: bool  # Linear weights stored [out, in]

    def __init__(self, family: Family, release: Release, config: Any, origin: str, tokenizer_dirs: Sequence[str]):
        self.family, self.release, self.config = family, release, config
        try:
            self.specs = release.specs(config)
        except ValueError as exc:  # the model's own checks: settings it does not implement
            raise ConversionError(f"{origin}: {exc}") from None
        self.tokenizer_dirs = tokenizer_dirs

    def tensors(self) -> Tensors:
        """Every spec's tensor in the source's layout, whole."""
        raise NotImplementedError

    def where(self, spec: TensorSpec) -> str:
        """The file(s) a tensor comes from, for messages."""
        raise NotImplementedError

    def stored_name(self, spec: TensorSpec) -> str:
        """A tensor's name in the source, for messages."""
        return spec.hf_name


class KeyedSource(Source):
    """Files of named tensors (hf, paddle), read one file at a time; each is closed before the next opens."""

    def __init__(self, family: Family, release: Release, config: Any, files: Sequence[str],
                 weight_map: Dict[str, str], hf: bool, origin: str, tokenizer_dirs: Sequence[str]):
        super().__init__(family, release, config, origin, tokenizer_dirs)
        self.files, self.hf, self.torch_layout = list(files), hf, hf
        self.opened: Dict[str, Getters] = {}
        if not weight_map:  # no index: the single file says what it holds
            self.opened = {files[0]: open_weights(files[0])}
            weight_map = dict.fromkeys(self.opened[files[0]], files[0])
        derived = release.derived(config, "float32") if hf else {}  # release tensors ours computes: checked
        self.checks = {name: value for name, value in derived.items() if not isinstance(value, str)}
        names = [self._name(spec) for spec in self.specs]
        expected = names + list(derived)
        found, left = match_names(weight_map, expected, _wrapper(names) if hf else "")
        _check_names(release, config, found, left, names, files[0] if len(files) == 1 else os.path.dirname(files[0]))
        self.key = found  # name -> stored key
        self.file = {name: weight_map[key] for name, key in found.items()}

    def _name(self, spec: TensorSpec) -> str:
        return spec.hf_name if self.hf else spec.name

    def where(self, spec: TensorSpec) -> str:
        return self.file[self._name(spec)]

    def stored_name(self, spec: TensorSpec) -> str:
        return self.key[self._name(spec)]

    def tensors(self) -> Tensors:
        by_file = defaultdict(list)
        for spec in self.specs:
            by_file[self.where(spec)].append(spec)
        for file in self.files:
            checks = [name for name in self.checks if self.file.get(name) == file]
            if not by_file[file] and not checks:
                continue
            getters = self.opened.pop(file, None) or open_weights(file)
            for spec in by_file[file]:
                yield spec, self._get(getters, self.key[self._name(spec)], file)
            for name in checks:
                stored = self._get(getters, self.key[name], file)
                if stored.shape != self.checks[name].shape or not np.array_equal(stored.astype("float32"),
                                                                                  self.checks[name]):
                    raise ConversionError(f"{file}: tensor {self.key[name]} differs from what our model computes "
                                          "for it (THUDM's): a modified model, which the conversion would change")
            del getters  # the file closes here (its memory map with it)

    @staticmethod
    def _get(getters: Getters, key: str, file: str) -> np.ndarray:
        if key not in getters:
            raise ConversionError(f"{file}: no tensor {key}, which the index says is in this file")
        return _read(getters, key, file)


class ThudmSource(Source):
    """A GLM training checkpoint of THUDM: model-parallel rank files, each a slice of every tensor."""

    torch_layout = True

    def __init__(self, files: Sequence[str], ranks: Sequence[Getters], config: Any, preset: Optional[str]):
        iteration_dir = os.path.dirname(os.path.abspath(files[0]))
        super().__init__(GLM, GLM.release, config, files[0],
                         [iteration_dir, os.path.dirname(iteration_dir)])
        self.files, self.ranks = list(files), list(ranks)
        self.copies = THUDM_EMBEDDING_COPIES.get(preset or "", [])
        names = [spec.hf_name for spec in self.specs]
        self.keys = []  # per rank: name -> stored key
        for file, getters in zip(files, ranks):
            found, left = match_names(getters, names, _wrapper(names))
            _check_names(self.release, config, found, left, names, file)
            self.keys.append(found)

    def where(self, spec: TensorSpec) -> str:
        return self.files[0] if len(self.files) == 1 else f"{os.path.dirname(self.files[0])}/mp_rank_*"

    def _rank_shape(self, spec: TensorSpec) -> Tuple[int, ...]:
        """The slice of a tensor (torch layout) that one THUDM model-parallel rank holds."""
        shape = list(spec.source_shape(torch_layout=True))
        if spec.mp_split != SAME:
            shape[1 if spec.mp_split == COLS else 0] //= len(self.files)
        return tuple(shape)

    def tensors(self) -> Tensors:
        for spec in self.specs:
            parts = []
            for file, getters, keys in zip(self.files, self.ranks, self.keys):
                part = _read(getters, keys[spec.hf_name], file)
                if part.shape != self._rank_shape(spec):
                    raise ConversionError(f"{file}: tensor {spec.hf_name} has shape {list(part.shape)}, expected "
                                          f"{list(self._rank_shape(spec))} (rank's share of "
                                          f"{list(spec.source_shape(True))} for {_describe(self.config)})")
                if spec.mp_split == SAME and parts and not np.array_equal(part, parts[0]):
                    raise ConversionError(f"{file}: tensor {spec.hf_name} differs from {self.files[0]}'s: replicated "
                                          "tensors must be equal on every rank")
                parts.append(part)
            array = merge_model_parallel(parts, spec.mp_split)
            if spec.hf_name.endswith("word_embeddings.weight") and self.copies:
                array = array.copy()
                for row, copy_to in self.copies:
                    array[copy_to] = array[row]
            yield spec, array


def _family_and_release(config: Dict[str, Any], origin: str) -> Tuple[Family, Release]:
    try:
        family = family_of(config)
    except ValueError as exc:
        raise ConversionError(f"{origin}: {exc}") from None
    if family.release is None:
        raise ConversionError(f"{origin}: no conversion is known for the {family.name} family")
    return family, family.release


def _config(make: Callable[..., Any], origin: str, *args: Any) -> Any:
    try:
        return make(*args)
    except (ValueError, TypeError) as exc:
        raise ConversionError(f"{origin}: {exc}") from None


def _read_json(path: str) -> Dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _config_json(directory: str, why: str) -> Tuple[str, Dict[str, Any]]:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{directory}: no config.json ({why})")
    return path, _read_json(path)


def thudm_rank_files(path: str) -> List[str]:
    """The mp_rank_XX_model_states.pt files of a THUDM checkpoint: its folder, an iteration folder, or one file."""
    if os.path.isfile(path):
        return [path]
    directory = path
    for tracker in ("latest_checkpointed_iteration.txt", "latest"):
        if os.path.isfile(os.path.join(path, tracker)):
            with open(os.path.join(path, tracker), encoding="utf-8") as handle:
                directory = os.path.join(path, handle.read().strip())
            break
    ranks = {}
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        match = re.fullmatch(r"mp_rank_(\d+)_model_states\.pt", name)
        if match:
            ranks[int(match.group(1))] = os.path.join(directory, name)
    if not ranks:
        raise ConversionError(f"{directory}: no mp_rank_XX_model_states.pt files")
    missing = [f"mp_rank_{rank:02d}_model_states.pt" for rank in range(max(ranks) + 1) if rank not in ranks]
    if missing:
        raise ConversionError(f"{directory}: model-parallel rank file(s) missing: {', '.join(missing)}")
    return [ranks[rank] for rank in sorted(ranks)]


def _thudm_hyperparameters(getters: Getters, ranks: int) -> Dict[str, Any]:
    """What a THUDM rank's tensors show of the config: everything but the number of heads."""
    def stored(name: str) -> Optional[str]:
        return next((key for key in getters if key == name or key.endswith("." + name)), None)

    layers = [int(m.group(1)) for key in getters if (m := re.search(r"(?:^|\.)transformer\.layers\.(\d+)\.", key))]
    block = stored("transformer.block_position_embeddings.weight") is not None
    values: Dict[str, Any] = {"num_layers": max(layers) + 1 if layers else None, "block_position_encoding": block}
    if stored("word_embeddings.weight"):
        vocab, values["hidden_size"] = getters[stored("word_embeddings.weight")]().shape
        values["vocab_size"] = vocab * ranks
    if stored("transformer.position_embeddings.weight"):
        values["max_sequence_length"] = getters[stored("transformer.position_embeddings.weight")]().shape[0] - block
    return values


def read_thudm(path: str, overrides: Dict[str, Any], preset: Optional[str]) -> Source:
    """A GLM training checkpoint of THUDM with any number of model-parallel ranks."""
    files = thudm_rank_files(path)
    ranks = [open_weights(file, state_key="module") for file in files]
    values = {**_thudm_hyperparameters(ranks[0], len(files)), **overrides}
    config = _config(GLM.release.config_from_ours, files[0], values, {})
    for key in ("vocab_size", "num_attention_heads"):
        if getattr(config, key) % len(files):
            raise ConversionError(f"{files[0]}: {key} {getattr(config, key)} does not split over {len(files)} ranks")
    return ThudmSource(files, ranks, config, preset)


def read_hf(path: str, overrides: Dict[str, Any], preset: Optional[str]) -> Source:
    """THUDM's Hugging Face release: config.json with pytorch_model*.bin or *.safetensors (single or sharded)."""
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    config_file, hf = _config_json(directory, "the Hugging Face layout keeps its hyper-parameters there")
    family, release = _family_and_release(hf, config_file)
    _refuse_quantized(hf, config_file)
    config = _config(release.config_from_hf, config_file, hf, overrides)
    if os.path.isfile(path):
        files, weight_map = [path], {}
    else:
        files, weight_map = _weights_in_directory(directory, [WEIGHT_FILES["hf", "safetensors"],
                                                              WEIGHT_FILES["hf", "bin"]])
    return KeyedSource(family, release, config, files, weight_map, True, config_file, [directory])


def read_paddle(path: str, overrides: Dict[str, Any], preset: Optional[str]) -> Source:
    """Ours or PaddleNLP's: config.json with model.safetensors or model_state.pdparams (single or sharded)."""
    config_file, values = _config_json(path, "ours keeps the model's config there")
    family, release = _family_and_release(values, config_file)
    _refuse_quantized(values, config_file)
    config = _config(release.config_from_ours, config_file, values, overrides)
    files, weight_map = _weights_in_directory(path, [WEIGHT_FILES["paddle", "safetensors"],
                                                     WEIGHT_FILES["paddle", "pdparams"]])
    return KeyedSource(family, release, config, files, weight_map, False, config_file, [path])


READERS = {"thudm": read_thudm, "hf": read_hf, "paddle": read_paddle}


# ---------------------------------------------------------------------------------------------- writers

class ShardedWriter:
    """Writes tensors as they come into files of at most `max_bytes`, named and indexed as `save_pretrained`
    names them: one `weights_name`, or `<stem>-00001-of-0000N<suffix>` files and the index `index_name`.
    Tensors are copied in (a view would keep its source file mapped until the shard is written)."""

    def __init__(self, directory: str, weights_name: str, index_name: str,
                 save: Callable[[Dict[str, np.ndarray], str], None], max_bytes: int):
        self.directory, self.weights_name, self.index_name = directory, weights_name, index_name
        self.save, self.max_bytes = save, max_bytes
        self.pending: Dict[str, np.ndarray] = {}
        self.pending_bytes = self.total_bytes = 0
        self.parts: List[Tuple[str, List[str]]] = []  # (temporary file, its tensors)

    def add(self, name: str, array: np.ndarray) -> None:
        if self.pending and self.pending_bytes + array.nbytes > self.max_bytes:
            self._flush()
        self.pending[name] = np.array(array, order="C", copy=True)
        self.pending_bytes += array.nbytes
        self.total_bytes += array.nbytes

    def _flush(self) -> None:
        stem, suffix = os.path.splitext(self.weights_name)
        part = os.path.join(self.directory, f".{stem}.part{len(self.parts) + 1}{suffix}")
        self.save(self.pending, part)
        self.parts.append((part, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def abort(self) -> None:
        """Remove what a failed conversion wrote."""
        for part, _ in self.parts:
            if os.path.exists(part):
                os.remove(part)

    def close(self) -> List[str]:
        """Name the files for good; returns their names."""
        if self.pending or not self.parts:
            self._flush()
        if len(self.parts) == 1:
            os.replace(self.parts[0][0], os.path.join(self.directory, self.weights_name))
            return [self.weights_name]
        stem, suffix = os.path.splitext(self.weights_name)
        weight_map = {}
        for number, (part, names) in enumerate(self.parts, 1):
            final = f"{stem}-{number:05d}-of-{len(self.parts):05d}{suffix}"
            os.replace(part, os.path.join(self.directory, final))
            weight_map.update(dict.fromkeys(names, final))
        with open(os.path.join(self.directory, self.index_name), "w", encoding="utf-8") as handle:
            json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, handle, indent=2)
        return sorted(set(weight_map.values())) + [self.index_name]


def _save_safetensors(tensors: Dict[str, np.ndarray], path: str, framework: str) -> None:
    from safetensors.numpy import save_file

    # PaddleNLP 2.8 reads only files that say "np" (and crashes on none); transformers wants "pt".
    save_file(tensors, path, metadata={"format": framework})


def _save_pdparams(tensors: Dict[str, np.ndarray], path: str) -> None:
    paddle.save({name: paddle.to_tensor(array, place=paddle.CPUPlace()) for name, array in tensors.items()}, path)


def _save_bin(tensors: Dict[str, np.ndarray], path: str) -> None:
    torch = _torch()
    torch.save({name: torch.from_numpy(array) for name, array in tensors.items()}, path)


SAVERS = {
    ("paddle", "safetensors"): partial(_save_safetensors, framework="np"),
    ("paddle", "pdparams"): _save_pdparams,
    ("hf", "safetensors"): partial(_save_safetensors, framework="pt"),
    ("hf", "bin"): _save_bin,
}


def _add_variant(filename: str, variant: str) -> str:
    """model.safetensors -> model.tp00.safetensors; model.safetensors.index.json -> model.safetensors.index.tp00.json
    (PaddleNLP's naming of tensor-parallel files)."""
    head, extension = filename.rsplit(".", 1)
    return f"{head}.{variant}.{extension}"


def _prepare_output(dst: str, overwrite: bool) -> None:
    os.makedirs(dst, exist_ok=True)
    stale = sorted(name for name in os.listdir(dst) if _WEIGHTS_OR_INDEX.match(name))
    if stale and not overwrite:
        raise ConversionError(f"{dst} already holds weights ({', '.join(stale)}): pick an empty directory or "
                              "pass --overwrite (loaders would otherwise mix old and new files)")
    for name in stale:
        os.remove(os.path.join(dst, name))


def _outputs(dst: str, target_layout: str, weights_format: str, degree: int, source: Source,
             max_shard_size: str) -> List[Tuple[ShardedWriter, Dict[str, Callable]]]:
    """One writer per output file set (the model, or each tensor-parallel rank) with the split actions of its
    rank: the model class's own (`_get_tensor_parallel_mappings` through `get_tensor_parallel_convert_actions`,
    which resolves its names under ours)."""
    weights_name, index_name = WEIGHT_FILES[target_layout, weights_format]
    save, max_bytes = SAVERS[target_layout, weights_format], convert_file_size_to_int(max_shard_size)
    if degree == 1:
        return [(ShardedWriter(dst, weights_name, index_name, save, max_bytes), {})]
    names = [spec.name for spec in source.specs]
    outputs = []
    for rank in range(degree):
        rank_config = copy.deepcopy(source.config)
        rank_config.tensor_parallel_degree, rank_config.tensor_parallel_rank = degree, rank
        actions = source.release.model_class.get_tensor_parallel_convert_actions(rank_config, names, is_split=True)
        variant = f"tp{rank:02d}"
        writer = ShardedWriter(dst, _add_variant(weights_name, variant), _add_variant(index_name, variant), save,
                               max_bytes)
        outputs.append((writer, actions))
    return outputs


def _target_tensor(source: Source, spec: TensorSpec, array: np.ndarray, target_layout: str,
                   dtype: Optional[str]) -> np.ndarray:
    """One tensor checked against the config, laid out for the target and cast."""
    expected = spec.source_shape(source.torch_layout)
    if tuple(array.shape) != expected:
        raise ConversionError(f"{source.where(spec)}: tensor {source.stored_name(spec)} has shape {list(array.shape)}, "
                              f"expected {list(expected)} for {_describe(source.config)}")
    if not np.issubdtype(array.dtype, np.floating):
        raise ConversionError(f"{source.where(spec)}: tensor {source.stored_name(spec)} holds {array.dtype}, not "
                              "floats")
    if spec.transposed and source.torch_layout != (target_layout == "hf"):
        array = array.T
    return array.astype(dtype or array.dtype, copy=False)


# ------------------------------------------------------------------------------------------- tokenizers

def _tokenizer_file(source: Source, spm: Optional[str]) -> Optional[str]:
    """--spm, or the family's sentencepiece model next to the source."""
    if spm:
        return spm
    found = [os.path.join(d, source.release.tokenizer_file) for d in source.tokenizer_dirs]
    return next((path for path in found if os.path.isfile(path)), None)


def _load_tokenizer(source: Source, spm: str, staging: str) -> Any:
    """The family's tokenizer over `spm` with the source's tokenizer settings (THUDM's or ours), loaded as the family
    loads a checkpoint's (its checks included) and checked to fit the model's vocabulary."""
    settings: Dict[str, Any] = {}
    for directory in source.tokenizer_dirs:
        if os.path.isfile(os.path.join(directory, "tokenizer_config.json")):
            settings = _read_json(os.path.join(directory, "tokenizer_config.json"))
            break
    settings = {key: value for key, value in settings.items() if key != "auto_map"}  # THUDM's code files: not ours
    settings["tokenizer_class"] = source.family.tokenizer_classes[0]
    settings.setdefault("name_or_path", os.path.abspath(source.tokenizer_dirs[0]))  # a model's name (chatglm2-6b/)
    shutil.copyfile(spm, os.path.join(staging, source.release.tokenizer_file))
    with open(os.path.join(staging, "tokenizer_config.json"), "w", encoding="utf-8") as handle:
        json.dump(settings, handle, ensure_ascii=False, indent=2)
    try:
        tokenizer = source.family.load_tokenizer(staging)
    except Exception as exc:
        raise ConversionError(f"{spm}: not a {source.family.name} tokenizer ({type(exc).__name__}: {exc})") from exc
    if len(tokenizer) > source.config.vocab_size:
        raise ConversionError(f"{spm}: its {len(tokenizer)} tokens do not fit the model's vocabulary of "
                              f"{source.config.vocab_size}: not this model's tokenizer")
    return tokenizer


def _save_tokenizer(tokenizer: Any, release: Release, dst: str, target_layout: str, staging: str) -> None:
    """Ours: as the tokenizer saves itself. Hugging Face: the sentencepiece model as THUDM's release names it and,
    where the release has one, its tokenizer_config.json naming THUDM's tokenizer class (its code files, as its
    model code files, are THUDM's to copy)."""
    if target_layout == "paddle":
        tokenizer.save_pretrained(dst)
        return
    saved = os.path.join(staging, "saved")
    tokenizer.save_pretrained(saved)
    shutil.copyfile(os.path.join(saved, release.tokenizer_file), os.path.join(dst, release.tokenizer_file))
    if release.hf_tokenizer:
        settings = {**_read_json(os.path.join(saved, "tokenizer_config.json")), **release.hf_tokenizer}
        with open(os.path.join(dst, "tokenizer_config.json"), "w", encoding="utf-8") as handle:
            json.dump(settings, handle, ensure_ascii=False, indent=2)


# ------------------------------------------------------------------------------------------- conversion

def _write_tensors(source: Source, outputs: List[Tuple[ShardedWriter, Dict[str, Callable]]], target_layout: str,
                   dtype: Optional[str]) -> str:
    """Stream every tensor into the outputs; returns the dtype written (the first tensor's unless asked)."""
    hf = target_layout == "hf"
    aliases = defaultdict(list)  # for --to hf: tensor -> the release's names of copies of it (a tied lm_head)
    for name, value in (source.release.derived(source.config, "float32") if hf else {}).items():
        if isinstance(value, str):
            aliases[value].append(name)
    for spec, array in tqdm(source.tensors(), total=len(source.specs), desc="converting", unit="tensor", disable=None):
        array = _target_tensor(source, spec, array, target_layout, dtype)
        dtype = str(array.dtype)
        name = spec.hf_name if hf else spec.name
        for writer, actions in outputs:
            writer.add(name, actions[name](array) if name in actions else array)
            for alias in aliases[name]:
                writer.add(alias, array)
        del array  # before the next tensor is read: it may be a view that keeps its source file mapped
    if hf:
        for name, value in source.release.derived(source.config, dtype).items():
            if not isinstance(value, str):
                outputs[0][0].add(name, value)
    return dtype


def convert(source_layout: str, target_layout: str, src: str, dst: str, *, weights_format: str = "safetensors",
            tensor_parallel_degree: int = 1, dtype: Optional[str] = None, spm: Optional[str] = None,
            preset: Optional[str] = None, config_overrides: Optional[Dict[str, Any]] = None,
            max_shard_size: str = "5GB", overwrite: bool = False) -> List[str]:
    """Convert the checkpoint `src` (layout thudm, hf or paddle) into `dst` (layout paddle or hf).

    Returns the weight files written. Raises ConversionError, naming file and tensor, on anything that does not
    fit: unreadable files, missing or unexpected tensors, shapes that contradict the config, quantized releases.
    """
    if (target_layout, weights_format) not in SAVERS:
        raise ConversionError(f"--to {target_layout} writes {' or '.join(f for t, f in SAVERS if t == target_layout)}, "
                              f"not {weights_format}")
    if tensor_parallel_degree < 1:
        raise ConversionError(f"--tensor_parallel_degree {tensor_parallel_degree}: give 1 (one model) or more")
    if tensor_parallel_degree > 1 and target_layout != "paddle":
        raise ConversionError("--tensor_parallel_degree writes PaddleNLP's tensor-parallel files: use --to paddle")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ConversionError(f"{dst}: write the conversion into another directory than its source")
    if preset is not None and preset not in PRESETS:
        raise ConversionError(f"unknown preset {preset}: choose one of {', '.join(PRESETS)}")
    given = {key: value for key, value in (config_overrides or {}).items() if value is not None}
    source = READERS[source_layout](src, {**PRESETS.get(preset or "", {}), **given}, preset)
    if preset is not None and source.family.name != "glm":
        raise ConversionError(f"--preset names GLM's released sizes; {src} is a {source.family.name} checkpoint")
    problems = source.family.tensor_parallel_problems(source.config, tensor_parallel_degree)
    if problems:
        raise ConversionError("; ".join(problems))

    with tempfile.TemporaryDirectory() as staging:
        spm = _tokenizer_file(source, spm)
        tokenizer = _load_tokenizer(source, spm, staging) if spm else None
        _prepare_output(dst, overwrite)
        outputs = _outputs(dst, target_layout, weights_format, tensor_parallel_degree, source, max_shard_size)
        try:
            dtype = _write_tensors(source, outputs, target_layout, dtype)
        except BaseException:
            for writer, _ in outputs:
                writer.abort()
            raise
        written = [name for writer, _ in outputs for name in writer.close()]

        config = source.config
        if target_layout == "paddle":
            config.architectures, config.dtype = [source.release.model_class.__name__], dtype
            config.save_pretrained(dst)
        else:
            with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as handle:
                json.dump(source.release.hf_config(config, dtype), handle, indent=2)
        if tokenizer is not None:
            _save_tokenizer(tokenizer, source.release, dst, target_layout, staging)
    logger.info(f"{src} ({source_layout}, {source.family.name}) -> {dst} ({target_layout}): {', '.join(written)}"
                + (f", tokenizer from {spm}" if spm else ", no tokenizer (give --spm)"))
    return written


# -------------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m paddle_glm.convert",
        description="Convert checkpoints of GLM, ChatGLM-6B and ChatGLM2/3-6B: THUDM's Hugging Face releases "
                    "(--from hf) or GLM training checkpoints (--from thudm) into ours/PaddleNLP's (--to paddle), and "
                    "ours into the Hugging Face layout (--from paddle --to hf). The family comes from config.json. "
                    "Reading .pt/.bin needs PyTorch (pip install 'paddle-glm[convert]'); safetensors do not.",
    )
    parser.add_argument("src", metavar="SRC", help="the checkpoint to convert: a Hugging Face or Paddle model folder "
                        "(config.json and the weights, single or sharded with an index); for GLM training "
                        "checkpoints THUDM's folder (with latest_checkpointed_iteration.txt), an iteration folder "
                        "of mp_rank_XX_model_states.pt files or one such file")
    parser.add_argument("dst", metavar="DST", help="folder to write config.json, the weights and the tokenizer to")
    parser.add_argument("--from", dest="source", required=True, choices=sorted(READERS),
                        help="layout of SRC: hf (THUDM's Hugging Face release), paddle (ours), thudm (GLM training "
                             "checkpoint)")
    parser.add_argument("--to", dest="target", default="paddle", choices=["paddle", "hf"],
                        help="layout to write: paddle (default; ours and PaddleNLP's) or hf (THUDM's Hugging Face "
                             "names, [out, in] weights and config.json, for its modeling_*.py)")
    parser.add_argument("--format", dest="weights_format", default="safetensors",
                        choices=["safetensors", "pdparams", "bin"],
                        help="weights file format: safetensors (default; model.safetensors), pdparams (--to paddle: "
                             "model_state.pdparams, for older PaddleNLP) or bin (--to hf: pytorch_model.bin)")
    parser.add_argument("--tensor_parallel_degree", type=int, default=1,
                        help="write N tensor-parallel shards (model.tp00.safetensors ... or "
                             "model_state.tp00.pdparams ...) split by the model's own rules (PaddleNLP's) instead of "
                             "one model (default 1)")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="GLM only: hyper-parameters of a released GLM (PaddleNLP's "
                             "GLM_PRETRAINED_INIT_CONFIGURATION), for THUDM checkpoints, which carry no config. With "
                             "glm-10b-chinese, word embedding 50007 is also copied to 50009, as THUDM's conversion to "
                             "its Hugging Face release does")
    shapes = parser.add_argument_group(
        "model shape", "override --preset and the source's config; a THUDM GLM checkpoint needs at least "
        "--num_attention_heads (or --preset): the other values show in its tensors")
    for name, what in zip(SHAPE_FLAGS, ("transformer layers", "hidden size", "attention heads",
                                        "vocabulary size (word embedding rows)",
                                        "longest sequence (GLM: position embedding rows, less 1 with block "
                                        "positions)")):
        shapes.add_argument(f"--{name}", type=int, help=what)
    parser.add_argument("--dtype", choices=["float32", "float16"],
                        help="cast the weights to this type (default: keep the source's; bfloat16 becomes float32)")
    parser.add_argument("--spm", help="sentencepiece model to write as the tokenizer (default: the family's, found "
                        "next to SRC: cog-pretrain.model, ice_text.model or tokenizer.model, with its "
                        "tokenizer_config.json; none found, no tokenizer is written)")
    parser.add_argument("--max_shard_size", default="5GB",
                        help="largest weights file (default 5GB); a bigger model is written in shards with an index, "
                             "as save_pretrained does. Memory needed: about this (per tensor-parallel rank) plus one "
                             "source file")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the weight files DST already holds (refused otherwise)")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    configure_logs(argv)
    args = build_parser().parse_args(argv)
    try:
        return convert(
            args.source, args.target, args.src, args.dst, weights_format=args.weights_format,
            tensor_parallel_degree=args.tensor_parallel_degree, dtype=args.dtype, spm=args.spm, preset=args.preset,
            config_overrides={name: getattr(args, name) for name in SHAPE_FLAGS},
            max_shard_size=args.max_shard_size, overwrite=args.overwrite,
        )
    except ConversionError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
