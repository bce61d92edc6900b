"""Convert GLM checkpoints between THUDM's PyTorch layouts and ours (PaddleNLP's).

    python -m paddle_glm.convert --from thudm --to paddle --preset glm-large-chinese CKPT_DIR OUT_DIR
    python -m paddle_glm.convert --from hf --to paddle glm-large-chinese/ OUT_DIR
    python -m paddle_glm.convert --from paddle --to hf OUR_CHECKPOINT OUT_DIR
    python -m paddle_glm.convert --from hf --to paddle --tensor_parallel_degree 2 SRC OUT_DIR

The three layouts hold the same tensors, those of THUDM's `GLMModel` (`GLM_TENSORS` below):
- thudm: training checkpoints of github.com/THUDM/GLM. `DIR/latest_checkpointed_iteration.txt` names the folder
  `DIR/<iteration>/` of `mp_rank_XX_model_states.pt` files, one per model-parallel rank, each with its state dict
  under "module" and its slice of every parallel tensor (`mpu/layers.py`; see SAME/ROWS/COLS/QKV). Linear
  weights are torch's [out, in]. No config: `--preset` or the shape flags give what the tensors do not show.
- hf: the Hugging Face release (THUDM/glm-large-chinese, ...): its `config.json` and `pytorch_model.bin` or
  `model.safetensors` (single, or sharded with an index), names under `glm.` (or none: both read), [out, in].
- paddle: ours and PaddleNLP's: `config.json` (PaddleNLP's GLMConfig) and `model.safetensors` or
  `model_state.pdparams` (single or sharded with an index), names under `glm.`, Linear weights [in, out].
  `--tensor_parallel_degree N` writes PaddleNLP's tensor-parallel shards (`model.tp0X.safetensors` or
  `model_state.tp0X.pdparams`), split by PaddleNLP's own rules so that its loaders and ours read them.

Tensors stream one at a time from the source (PyTorch files memory-mapped) into output files cut at
`--max_shard_size` as `save_pretrained` cuts them, so memory holds about two shards' worth (a shard and its
serialized bytes), not the model.

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
import zipfile
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import paddle
from paddlenlp.transformers.glm.configuration import GLM_PRETRAINED_INIT_CONFIGURATION
from paddlenlp.transformers.utils import convert_file_size_to_int
from .logs import logger
from tqdm import tqdm

from .models.glm import GLMConfig, GLMForConditionalGeneration

__all__ = ["ConversionError", "GLM_TENSORS", "TensorSpec", "convert", "glm_tensor_specs", "main"]

PREFIX = "glm."  # ours and the HF release keep GLMModel under GLMForConditionalGeneration.glm
TOKENIZER_FILE = "cog-pretrain.model"  # GLM's sentencepiece model, as THUDM and PaddleNLP name it
PRESETS = {name.split("/")[-1]: values for name, values in GLM_PRETRAINED_INIT_CONFIGURATION.items()}
SHAPE_FLAGS = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_sequence_length")

# How THUDM's model parallelism splits a tensor (torch layout) over the ranks; change_mp.py merges likewise.
SAME = "same"  # replicated on every rank
ROWS = "rows"  # dim 0: VocabParallelEmbedding; ColumnParallelLinear weight and bias
COLS = "cols"  # dim 1: RowParallelLinear weight (its bias is replicated)
QKV = "qkv"  # ColumnParallelLinear(stride=3): rank r holds [q_r; k_r; v_r], the rows of its own heads

# GLMModel's tensors by THUDM's name (ours and HF's add `glm.`): (model-parallel split, torch shape with
# h = hidden, v = vocabulary, p = position rows, and whether torch stores it [out, in] where Paddle has [in, out]).
GLM_TENSORS: Dict[str, Tuple[str, Tuple[str, ...], bool]] = {
    "word_embeddings.weight": (ROWS, ("v", "h"), False),
    "transformer.position_embeddings.weight": (SAME, ("p", "h"), False),
    "transformer.block_position_embeddings.weight": (SAME, ("p", "h"), False),
    "transformer.layers.{i}.input_layernorm.weight": (SAME, ("h",), False),
    "transformer.layers.{i}.input_layernorm.bias": (SAME, ("h",), False),
    "transformer.layers.{i}.attention.query_key_value.weight": (QKV, ("3h", "h"), True),
    "transformer.layers.{i}.attention.query_key_value.bias": (QKV, ("3h",), False),
    "transformer.layers.{i}.attention.dense.weight": (COLS, ("h", "h"), True),
    "transformer.layers.{i}.attention.dense.bias": (SAME, ("h",), False),
    "transformer.layers.{i}.post_attention_layernorm.weight": (SAME, ("h",), False),
    "transformer.layers.{i}.post_attention_layernorm.bias": (SAME, ("h",), False),
    "transformer.layers.{i}.mlp.dense_h_to_4h.weight": (ROWS, ("4h", "h"), True),
    "transformer.layers.{i}.mlp.dense_h_to_4h.bias": (ROWS, ("4h",), False),
    "transformer.layers.{i}.mlp.dense_4h_to_h.weight": (COLS, ("h", "4h"), True),
    "transformer.layers.{i}.mlp.dense_4h_to_h.bias": (SAME, ("h",), False),
    "transformer.final_layernorm.weight": (SAME, ("h",), False),
    "transformer.final_layernorm.bias": (SAME, ("h",), False),
}
_GLM_NAME = re.compile("|".join(re.escape(p.format(i="<i>")).replace("<i>", r"\d+") for p in GLM_TENSORS))
# What wraps GLMModel's names: ours and HF's `glm.`, THUDM's FP16_Module `module.`, its task models `model.`.
WRAPPER_PREFIXES = (PREFIX, "module.", "model.")

# THUDM's own conversion of glm-10b-chinese into its Hugging Face release copies word embedding rows (source,
# destination) to match the released tokenizer's ids (scripts/convert_glm_checkpoint_to_transformers.py); the
# same preset of a THUDM checkpoint gets the same copy, so that it equals the release.
THUDM_EMBEDDING_COPIES = {"glm-10b-chinese": [(50007, 50009)]}

# Fields of the HF release's GLMConfig (its configuration_glm.py) that PaddleNLP's GLMConfig shares.
HF_CONFIG_FIELDS = (
    "num_layers", "vocab_size", "hidden_size", "num_attention_heads", "embedding_dropout_prob",
    "attention_dropout_prob", "output_dropout_prob", "max_sequence_length", "checkpoint_num_layers",
    "parallel_output", "relative_encoding", "block_position_encoding", "output_predict", "spell_length",
    "spell_func", "attention_scale", "initializer_range", "pool_token",
)
# The release's model classes live in its own code files (trust_remote_code), which we do not ship.
HF_AUTO_MAP = {
    "AutoConfig": "configuration_glm.GLMConfig",
    "AutoModel": "modeling_glm.GLMModel",
    "AutoModelForSeq2SeqLM": "modeling_glm.GLMForConditionalGeneration",
    "AutoModelForMultipleChoice": "modeling_glm.GLMForMultipleChoice",
}

# (weights file, index of its shards) per layout and format, as PaddleNLP 2.8 and transformers name them.
WEIGHT_FILES = {
    ("paddle", "safetensors"): ("model.safetensors", "model.safetensors.index.json"),
    ("paddle", "pdparams"): ("model_state.pdparams", "model_state.pdparams.index.json"),
    ("hf", "safetensors"): ("model.safetensors", "model.safetensors.index.json"),
    ("hf", "bin"): ("pytorch_model.bin", "pytorch_model.bin.index.json"),
}
_WEIGHTS_OR_INDEX = re.compile(r"(model|model_state|pytorch_model)\b.*\.(safetensors|pdparams|bin|json)$")

Getters = Dict[str, Callable[[], np.ndarray]]  # tensor name -> reads it


class ConversionError(Exception):
    """A checkpoint that cannot be converted as asked; the message names the file and the tensor."""


# ---------------------------------------------------------------------------------------------- tensors

@dataclass(frozen=True)
class TensorSpec:
    name: str  # THUDM's name; ours and HF's are PREFIX + name
    torch_shape: Tuple[int, ...]
    mp_split: str  # SAME, ROWS, COLS or QKV
    transposed: bool  # torch stores it [out, in], Paddle [in, out]

    def shape(self, torch_layout: bool) -> Tuple[int, ...]:
        return self.torch_shape[::-1] if self.transposed and not torch_layout else self.torch_shape

    def rank_shape(self, ranks: int) -> Tuple[int, ...]:
        """The slice one of `ranks` THUDM model-parallel ranks holds."""
        shape = list(self.torch_shape)
        if self.mp_split != SAME:
            shape[1 if self.mp_split == COLS else 0] //= ranks
        return tuple(shape)


def glm_tensor_specs(config: GLMConfig) -> List[TensorSpec]:
    """Every tensor of a GLM with this config, in model order, with its whole shape."""
    h = config.hidden_size
    positions = config.max_sequence_length + (1 if config.block_position_encoding else 0)
    sizes = {"h": h, "3h": 3 * h, "4h": 4 * h, "v": config.vocab_size, "p": positions}
    specs = []
    for pattern, (split, dims, transposed) in GLM_TENSORS.items():
        if "block_position" in pattern and not config.block_position_encoding:
            continue
        layers = range(config.num_layers) if "{i}" in pattern else [0]
        specs += [TensorSpec(pattern.format(i=i), tuple(sizes[d] for d in dims), split, transposed) for i in layers]
    return specs


def canonical_name(key: str) -> str:
    """THUDM's name for a key that may carry `glm.`, `module.` or `model.` in front (others come back as given)."""
    for candidate in [key] + [key[len(p):] for p in WRAPPER_PREFIXES if key.startswith(p)]:
        if _GLM_NAME.fullmatch(candidate):
            return candidate
    return key


def merge_model_parallel(parts: Sequence[np.ndarray], split: str) -> np.ndarray:
    """Undo THUDM's model-parallel split of one tensor (torch layout), as change_mp.py does."""
    if split == SAME or len(parts) == 1:
        return parts[0]
    if split == QKV:  # [q_0; k_0; v_0], [q_1; k_1; v_1], ... -> [q_0; q_1; ...; k_0; k_1; ...; v_0; v_1; ...]
        thirds = [np.split(part, 3, axis=0) for part in parts]
        return np.concatenate([third[i] for i in range(3) for third in thirds], axis=0)
    return np.concatenate(parts, axis=1 if split == COLS else 0)


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
    """A lazy reader per tensor of one weights file (.safetensors, .pdparams, or .pt/.bin [under state_key])."""
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
    return {canonical_name(key): getter for key, getter in getters.items()}


def _read(getters: Getters, name: str, path: str) -> np.ndarray:
    try:
        return getters[name]()
    except Exception as exc:
        raise ConversionError(f"{path}: tensor {name}: unreadable ({type(exc).__name__}: {exc})") from exc


def _weights_in_directory(directory: str, candidates: Sequence[Tuple[str, str]]) -> List[str]:
    """The weights files of a checkpoint directory: those its index lists, or its single file."""
    for single, index in candidates:
        if os.path.isfile(os.path.join(directory, index)):
            with open(os.path.join(directory, index), encoding="utf-8") as handle:
                return [os.path.join(directory, name) for name in sorted(set(json.load(handle)["weight_map"].values()))]
        if os.path.isfile(os.path.join(directory, single)):
            return [os.path.join(directory, single)]
    looked_for = ", ".join(name for pair in candidates for name in pair)
    shards = [name for name in os.listdir(directory) if ".tp0" in name] if os.path.isdir(directory) else []
    hint = f"; {', '.join(sorted(shards))} are tensor-parallel shards: merge them first" if shards else ""
    raise ConversionError(f"{directory}: no weights (looked for {looked_for}){hint}")


# ---------------------------------------------------------------------------------------------- sources

@dataclass
class Source:
    """A checkpoint opened for conversion: its config, and each tensor read on demand."""
    config: GLMConfig
    torch_layout: bool  # Linear weights stored [out, in]
    where: Dict[str, str]  # tensor name -> the file(s) it comes from, for messages
    read: Callable[[TensorSpec], np.ndarray]  # the whole tensor in the source's layout
    tokenizer_file: Optional[str]


def _config(values: Dict[str, Any], origin: str) -> GLMConfig:
    """PaddleNLP's GLMConfig from a source's hyper-parameters, refusing what our model does not implement."""
    values = {k: v for k, v in values.items()
              if k not in ("architectures", "dtype", "torch_dtype", "tensor_parallel_degree", "tensor_parallel_rank")}
    missing = [name for name in SHAPE_FLAGS if values.get(name) is None]
    if missing:
        flags = " ".join(f"--{name}" for name in missing)
        raise ConversionError(f"{origin}: the checkpoint does not tell {', '.join(missing)}: give {flags} "
                              f"or --preset ({', '.join(PRESETS)})")
    if values["hidden_size"] % values["num_attention_heads"]:
        raise ConversionError(f"{origin}: hidden_size {values['hidden_size']} is no multiple of "
                              f"num_attention_heads {values['num_attention_heads']}")
    if values.get("relative_encoding") or float(values.get("attention_scale", 1.0)) != 1.0:
        raise ConversionError(f"{origin}: relative_encoding and attention_scale != 1 are not implemented by our GLM")
    values["output_predict"] = True  # the tied language-model head
    return GLMConfig(**values)


def _check_names(config: GLMConfig, found: Iterable[str], origin: str) -> None:
    expected, found = _names(config), set(found)
    missing, unexpected = [n for n in expected if n not in found], sorted(found - set(expected))
    shape = f"a {config.num_layers}-layer GLM"
    if missing:
        raise ConversionError(f"{origin}: missing tensor(s) of {shape}: {', '.join(missing[:8])}"
                              + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    if unexpected:
        raise ConversionError(f"{origin}: tensor(s) not part of {shape}: {', '.join(unexpected[:8])} "
                              "(a task head or prompt encoder, or more layers than the config says?)")


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
    layers = [int(m.group(1)) for key in getters if (m := re.match(r"transformer\.layers\.(\d+)\.", key))]
    block = "transformer.block_position_embeddings.weight" in getters
    values: Dict[str, Any] = {"num_layers": max(layers) + 1 if layers else None, "block_position_encoding": block}
    if "word_embeddings.weight" in getters:
        vocab, values["hidden_size"] = getters["word_embeddings.weight"]().shape
        values["vocab_size"] = vocab * ranks
    if "transformer.position_embeddings.weight" in getters:
        values["max_sequence_length"] = getters["transformer.position_embeddings.weight"]().shape[0] - block
    return values


def read_thudm(path: str, overrides: Dict[str, Any]) -> Source:
    """A THUDM training checkpoint with any number of model-parallel ranks."""
    files = thudm_rank_files(path)
    ranks = [open_weights(file, state_key="module") for file in files]
    config = _config({**_thudm_hyperparameters(ranks[0], len(files)), **overrides}, origin=files[0])
    for key in ("vocab_size", "num_attention_heads"):
        if getattr(config, key) % len(files):
            raise ConversionError(f"{files[0]}: {key} {getattr(config, key)} does not split over {len(files)} ranks")
    for file, getters in zip(files, ranks):
        _check_names(config, getters, file)

    def read(spec: TensorSpec) -> np.ndarray:
        parts = []
        for file, getters in zip(files, ranks):
            part = _read(getters, spec.name, file)
            if part.shape != spec.rank_shape(len(files)):
                raise ConversionError(f"{file}: tensor {spec.name} has shape {list(part.shape)}, expected "
                                      f"{list(spec.rank_shape(len(files)))} (rank's share of "
                                      f"{list(spec.torch_shape)} for {_describe(config)})")
            if spec.mp_split == SAME and parts and not np.array_equal(part, parts[0]):
                raise ConversionError(f"{file}: tensor {spec.name} differs from {files[0]}'s: replicated tensors "
                                      "must be equal on every rank")
            parts.append(part)
        return merge_model_parallel(parts, spec.mp_split)

    where = dict.fromkeys(_names(config), files[0] if len(files) == 1 else f"{os.path.dirname(files[0])}/mp_rank_*")
    iteration_dir = os.path.dirname(os.path.abspath(files[0]))
    tokenizer = _find_tokenizer(iteration_dir, os.path.dirname(iteration_dir))
    return Source(config, True, where, read, tokenizer)


def read_hf(path: str, overrides: Dict[str, Any]) -> Source:
    """The Hugging Face release: config.json with pytorch_model.bin or *.safetensors."""
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    config_file = os.path.join(directory, "config.json")
    if not os.path.isfile(config_file):
        raise ConversionError(f"{directory}: no config.json (the Hugging Face layout keeps its hyper-parameters there)")
    with open(config_file, encoding="utf-8") as handle:
        hf = json.load(handle)
    hf.setdefault("num_layers", hf.get("num_hidden_layers"))
    values = {key: hf[key] for key in HF_CONFIG_FIELDS + ("layernorm_epsilon",) if key in hf}
    config = _config({**values, **overrides}, origin=config_file)
    candidates = [WEIGHT_FILES["hf", "safetensors"], WEIGHT_FILES["hf", "bin"]]
    files = [path] if os.path.isfile(path) else _weights_in_directory(directory, candidates)
    return _keyed_source(config, files, torch_layout=True, tokenizer=_find_tokenizer(directory))


def read_paddle(path: str, overrides: Dict[str, Any]) -> Source:
    """Ours or PaddleNLP's: config.json with model.safetensors or model_state.pdparams."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ConversionError(f"{path}: no config.json")
    with open(config_file, encoding="utf-8") as handle:
        config = _config({**json.load(handle), **overrides}, origin=config_file)
    files = _weights_in_directory(path, [WEIGHT_FILES["paddle", "safetensors"], WEIGHT_FILES["paddle", "pdparams"]])
    return _keyed_source(config, files, torch_layout=False, tokenizer=_find_tokenizer(path))


def _keyed_source(config: GLMConfig, files: Sequence[str], torch_layout: bool, tokenizer: Optional[str]) -> Source:
    getters: Getters = {}
    where: Dict[str, str] = {}
    for file in files:
        for name, getter in open_weights(file).items():
            getters[name], where[name] = getter, file
    _check_names(config, getters, files[0] if len(files) == 1 else os.path.dirname(files[0]))
    return Source(config, torch_layout, where, lambda spec: _read(getters, spec.name, where[spec.name]), tokenizer)


def _names(config: GLMConfig) -> List[str]:
    return [spec.name for spec in glm_tensor_specs(config)]


def _describe(config: GLMConfig) -> str:
    return ", ".join(f"{name}={getattr(config, name)}" for name in SHAPE_FLAGS)


def _find_tokenizer(*directories: str) -> Optional[str]:
    found = [os.path.join(d, TOKENIZER_FILE) for d in directories if os.path.isfile(os.path.join(d, TOKENIZER_FILE))]
    return found[0] if found else None


READERS = {"thudm": read_thudm, "hf": read_hf, "paddle": read_paddle}


# ---------------------------------------------------------------------------------------------- writers

class ShardedWriter:
    """Writes tensors as they come into files of at most `max_bytes`, named and indexed as `save_pretrained`
    names them: one `weights_name`, or `<stem>-00001-of-0000N<suffix>` files and the index `index_name`."""

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
        self.pending[name] = np.ascontiguousarray(array)
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


def hf_config(config: GLMConfig, dtype: str) -> Dict[str, Any]:
    """config.json for the Hugging Face release's GLM classes."""
    values = {field: getattr(config, field) for field in HF_CONFIG_FIELDS}
    return {"architectures": ["GLMForConditionalGeneration"], "auto_map": HF_AUTO_MAP, "model_type": "glm",
            **values, "max_memory_length": 0, "checkpoint_activations": False, "torch_dtype": dtype}


def _tokenizer(spm_file: str, config: GLMConfig) -> Any:
    """GLM's tokenizer over `spm_file`, checked to fit the model's vocabulary."""
    from .models.glm import tokenizer_from_sentencepiece

    try:
        tokenizer = tokenizer_from_sentencepiece(spm_file)
    except Exception as exc:
        raise ConversionError(f"{spm_file}: not a GLM sentencepiece model ({type(exc).__name__}: {exc})") from exc
    if len(tokenizer) > config.vocab_size:
        raise ConversionError(f"{spm_file}: its {len(tokenizer)} tokens do not fit the model's vocabulary of "
                              f"{config.vocab_size}: not this model's tokenizer")
    return tokenizer


def _outputs(dst: str, target_layout: str, weights_format: str, degree: int, config: GLMConfig,
             max_shard_size: str) -> List[Tuple[ShardedWriter, Dict[str, Callable]]]:
    """One writer per output file set (the model, or each tensor-parallel rank) with the split actions of its
    rank: PaddleNLP's own (`_get_tensor_parallel_mappings` through `get_tensor_parallel_convert_actions`, which
    puts the `glm.` in front of its names)."""
    weights_name, index_name = WEIGHT_FILES[target_layout, weights_format]
    save, max_bytes = SAVERS[target_layout, weights_format], convert_file_size_to_int(max_shard_size)
    if degree == 1:
        return [(ShardedWriter(dst, weights_name, index_name, save, max_bytes), {})]
    names = [PREFIX + name for name in _names(config)]
    outputs = []
    for rank in range(degree):
        rank_config = copy.deepcopy(config)
        rank_config.tensor_parallel_degree, rank_config.tensor_parallel_rank = degree, rank
        actions = GLMForConditionalGeneration.get_tensor_parallel_convert_actions(rank_config, names, is_split=True)
        variant = f"tp{rank:02d}"
        writer = ShardedWriter(dst, _add_variant(weights_name, variant), _add_variant(index_name, variant), save,
                               max_bytes)
        outputs.append((writer, actions))
    return outputs


def _target_tensor(source: Source, spec: TensorSpec, target_layout: str, dtype: Optional[str]) -> np.ndarray:
    """One tensor read, checked against the config, laid out for the target and cast."""
    array = source.read(spec)
    expected = spec.shape(source.torch_layout)
    if tuple(array.shape) != expected:
        raise ConversionError(f"{source.where[spec.name]}: tensor {spec.name} has shape {list(array.shape)}, "
                              f"expected {list(expected)} for {_describe(source.config)}")
    if not np.issubdtype(array.dtype, np.floating):
        raise ConversionError(f"{source.where[spec.name]}: tensor {spec.name} holds {array.dtype}, not floats")
    if spec.transposed and source.torch_layout != (target_layout == "hf"):
        array = array.T
    return array.astype(dtype or array.dtype, copy=False)


# ------------------------------------------------------------------------------------------- conversion

def convert(source_layout: str, target_layout: str, src: str, dst: str, *, weights_format: str = "safetensors",
            tensor_parallel_degree: int = 1, dtype: Optional[str] = None, spm: Optional[str] = None,
            preset: Optional[str] = None, config_overrides: Optional[Dict[str, Any]] = None,
            max_shard_size: str = "5GB", overwrite: bool = False) -> List[str]:
    """Convert the checkpoint `src` (layout thudm, hf or paddle) into `dst` (layout paddle or hf).

    Returns the weight files written. Raises ConversionError, naming file and tensor, on anything that does not
    fit: unreadable files, missing or unexpected tensors, shapes that contradict the config.
    """
    if (target_layout, weights_format) not in SAVERS:
        raise ConversionError(f"--to {target_layout} writes {' or '.join(f for t, f in SAVERS if t == target_layout)}, "
                              f"not {weights_format}")
    if tensor_parallel_degree > 1 and target_layout != "paddle":
        raise ConversionError("--tensor_parallel_degree writes PaddleNLP's tensor-parallel files: use --to paddle")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ConversionError(f"{dst}: write the conversion into another directory than its source")
    if preset is not None and preset not in PRESETS:
        raise ConversionError(f"unknown preset {preset}: choose one of {', '.join(PRESETS)}")
    given = {key: value for key, value in (config_overrides or {}).items() if value is not None}
    overrides = {**PRESETS.get(preset or "", {}), **given}
    source = READERS[source_layout](src, overrides)
    config = source.config
    spm = spm or source.tokenizer_file
    tokenizer = _tokenizer(spm, config) if spm else None
    if tensor_parallel_degree > 1 and (config.num_attention_heads % tensor_parallel_degree
                                       or config.vocab_size % tensor_parallel_degree):
        raise ConversionError(f"--tensor_parallel_degree {tensor_parallel_degree} must divide the "
                              f"{config.num_attention_heads} heads and the vocabulary of {config.vocab_size}")
    _prepare_output(dst, overwrite)

    specs = glm_tensor_specs(config)
    outputs = _outputs(dst, target_layout, weights_format, tensor_parallel_degree, config, max_shard_size)
    try:
        for spec in tqdm(specs, desc="converting", unit="tensor", disable=None):
            array = _target_tensor(source, spec, target_layout, dtype)
            if source_layout == "thudm" and spec.name == "word_embeddings.weight":
                for row, copy_to in THUDM_EMBEDDING_COPIES.get(preset or "", []):
                    array = array.copy()
                    array[copy_to] = array[row]
            dtype = str(array.dtype)  # the first tensor's unless asked
            for writer, actions in outputs:
                name = PREFIX + spec.name
                writer.add(name, actions[name](array) if name in actions else array)
    except BaseException:
        for writer, _ in outputs:
            writer.abort()
        raise
    written = [name for writer, _ in outputs for name in writer.close()]

    if target_layout == "paddle":
        config.architectures, config.dtype = ["GLMForConditionalGeneration"], dtype
        config.save_pretrained(dst)
    else:
        with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as handle:
            json.dump(hf_config(config, dtype), handle, indent=2)
    if tokenizer is not None and target_layout == "paddle":
        tokenizer.save_pretrained(dst)
    elif tokenizer is not None:  # the release's tokenization_glm.py reads the sentencepiece model itself
        shutil.copyfile(spm, os.path.join(dst, TOKENIZER_FILE))
    logger.info(f"{src} ({source_layout}) -> {dst} ({target_layout}): {', '.join(written)}"
                + (f", tokenizer from {spm}" if spm else ", no tokenizer (give --spm)"))
    return written


# -------------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m paddle_glm.convert",
        description="Convert GLM checkpoints: THUDM's training checkpoints (--from thudm) or the Hugging Face "
                    "release (--from hf) into ours/PaddleNLP's (--to paddle), and ours into the Hugging Face "
                    "layout (--from paddle --to hf). Reading .pt/.bin needs PyTorch (pip install "
                    "'paddle-glm[convert]'); safetensors do not.",
    )
    parser.add_argument("src", metavar="SRC", help="the checkpoint to convert: THUDM's folder (with "
                        "latest_checkpointed_iteration.txt), an iteration folder of mp_rank_XX_model_states.pt "
                        "files or one such file; a Hugging Face or Paddle model folder")
    parser.add_argument("dst", metavar="DST", help="folder to write config.json, the weights and the tokenizer to")
    parser.add_argument("--from", dest="source", required=True, choices=sorted(READERS),
                        help="layout of SRC: thudm (training checkpoint), hf (Hugging Face release), paddle (ours)")
    parser.add_argument("--to", dest="target", default="paddle", choices=["paddle", "hf"],
                        help="layout to write: paddle (default; ours and PaddleNLP's) or hf (Hugging Face: [out, in] "
                             "weights under glm., for the release's modeling_glm.py)")
    parser.add_argument("--format", dest="weights_format", default="safetensors",
                        choices=["safetensors", "pdparams", "bin"],
                        help="weights file format: safetensors (default; model.safetensors), pdparams (--to paddle: "
                             "model_state.pdparams, for older PaddleNLP) or bin (--to hf: pytorch_model.bin)")
    parser.add_argument("--tensor_parallel_degree", type=int, default=1,
                        help="write N tensor-parallel shards (model.tp00.safetensors ... or "
                             "model_state.tp00.pdparams ...) split by PaddleNLP's rules instead of one model "
                             "(default 1)")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="hyper-parameters of a released GLM (PaddleNLP's GLM_PRETRAINED_INIT_CONFIGURATION), "
                             "for THUDM checkpoints, which carry no config. With glm-10b-chinese, word embedding "
                             "50007 is also copied to 50009, as THUDM's conversion to its Hugging Face release does")
    shapes = parser.add_argument_group(
        "model shape", "override --preset and the source's config; a THUDM checkpoint needs at least "
        "--num_attention_heads (or --preset): the other values show in its tensors")
    for name, what in zip(SHAPE_FLAGS, ("transformer layers", "hidden size", "attention heads",
                                        "vocabulary size (word embedding rows)",
                                        "longest sequence (position embedding rows, less 1 with block positions)")):
        shapes.add_argument(f"--{name}", type=int, help=what)
    parser.add_argument("--dtype", choices=["float32", "float16"],
                        help="cast the weights to this type (default: keep the source's; bfloat16 becomes float32)")
    parser.add_argument("--spm", help=f"sentencepiece model to write as the tokenizer (default: {TOKENIZER_FILE} "
                        "found next to SRC; none found, no tokenizer is written)")
    parser.add_argument("--max_shard_size", default="5GB",
                        help="largest weights file (default 5GB); a bigger model is written in shards with an index, "
                             "as save_pretrained does. Memory needed: about twice this")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the weight files DST already holds (refused otherwise)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
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
