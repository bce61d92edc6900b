"""LoRA adapters through `paddlenlp.peft`, configured from the command line (the reference hard-codes r=4).

With tensor parallelism the adapters of our column/row-parallel layers are laid out as PaddleNLP's
(column: A [in, r] replicated, B [r, out/N] split; row: A [in/N, r] split, B [r, out] replicated) and saved
whole or as `lora_model_state.tpXX.pdparams` shards, with one fix: an adapter tensor split across ranks follows the
split rule of the weight it adapts, as the model class defines it (GLM's per-head QKV, ChatGLM2/3's [Q | K | V]
blocks with replicated K/V groups and [gate | up] halves). PaddleNLP splits them as plain blocks, misaligned with
the weight shards they adapt.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import paddle
import paddle.nn as nn
from paddle import Tensor
from .logs import logger
from paddlenlp.peft import LoRAConfig, LoRAModel

from .args import InputError
from .parallel import (
    ColumnParallelLinear, RowParallelLinear, copy_to_model_parallel, reduce_from_model_parallel, tensor_parallel_degree,
)

__all__ = [
    "GLMLoRAModel", "add_lora", "merged_state_dict", "merged_model", "load_with_adapter", "load_adapter",
    "check_adapter",
]


class _ParallelLoRA:
    """Adapter parameters on a tensor-parallel linear layer that keeps the base layer's weight and bias."""

    def _add_adapter(self, base: nn.Layer, config: LoRAConfig, a_shape: List[int], b_shape: List[int],
                     split: str) -> None:
        nn.Layer.__init__(self)
        self.weight, self.bias = base.weight, base.bias
        # PaddleNLP's LoRALinear initialisation. Replicated tensors start equal on every rank: fleet's TensorParallel
        # wrapper broadcasts the parameters that are not `is_distributed` across the model-parallel group.
        self.lora_A = self.create_parameter(a_shape, default_initializer=nn.initializer.KaimingUniform(
            negative_slope=math.sqrt(5), nonlinearity="leaky_relu"))
        self.lora_B = self.create_parameter(b_shape, default_initializer=nn.initializer.Constant(0.0))
        getattr(self, split).is_distributed = True
        self.scaling = config.lora_alpha / (math.sqrt(config.r) if config.rslora else config.r)
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.merged = False


class ColumnParallelLoRALinear(_ParallelLoRA, ColumnParallelLinear):
    """x W + b + dropout(x) A B_rank * scaling; the replicated A gets the gradient summed over ranks."""

    def __init__(self, base: ColumnParallelLinear, config: LoRAConfig):
        in_features, out_per_rank = base.weight.shape
        self._add_adapter(base, config, [in_features, config.r], [config.r, out_per_rank], split="lora_B")

    def forward(self, hidden_states: Tensor) -> Tensor:
        down = copy_to_model_parallel(paddle.matmul(self.lora_dropout(hidden_states), self.lora_A))
        return super().forward(hidden_states) + paddle.matmul(down, self.lora_B) * self.scaling


class RowParallelLoRALinear(_ParallelLoRA, RowParallelLinear):
    """sum_rank(x_rank W_rank) + b + sum_rank(dropout(x_rank) A_rank) B * scaling."""

    def __init__(self, base: RowParallelLinear, config: LoRAConfig):
        in_per_rank, out_features = base.weight.shape
        self._add_adapter(base, config, [in_per_rank, config.r], [config.r, out_features], split="lora_A")

    def forward(self, hidden_states: Tensor) -> Tensor:
        down = reduce_from_model_parallel(paddle.matmul(self.lora_dropout(hidden_states), self.lora_A))
        return super().forward(hidden_states) + paddle.matmul(down, self.lora_B) * self.scaling


# our parallel layer -> (its LoRA form, the adapter tensor split across ranks, PaddleNLP's is_column for it)
_PARALLEL_LORA = {ColumnParallelLinear: (ColumnParallelLoRALinear, "lora_B", True),
                  RowParallelLinear: (RowParallelLoRALinear, "lora_A", False)}


class GLMLoRAModel(LoRAModel):
    """`LoRAModel` that also adapts our tensor-parallel layers.

    PaddleNLP's only knows fleet's parallel layers, whose LoRA forward calls `c_identity` (no CPU kernel)
    and fails on ours; plain `nn.Linear` layers still go to PaddleNLP's `LoRALinear`.
    """

    def _find_and_replace_module(self, model, module_name, lora_config, enable_lora):
        parent_name, _, attribute = module_name.rpartition(".")
        parent = model.get_sublayer(parent_name) if parent_name else model
        module = getattr(parent, attribute)
        if type(module) not in _PARALLEL_LORA:
            return super()._find_and_replace_module(model, module_name, lora_config, enable_lora)
        if enable_lora is not None:
            raise InputError("enable_lora_list (merged QKV adapters) is not supported with tensor parallelism")
        lora_class, split, is_column = _PARALLEL_LORA[type(module)]
        setattr(parent, attribute, lora_class(module, lora_config))
        self.add_lora_split_mapping(f"{module_name}.{split}", is_column=is_column)

    def __init__(self, model, lora_config: LoRAConfig) -> None:
        super().__init__(model, lora_config)
        _family(model).prepare_lora(self)

    def _get_tensor_parallel_mappings(self, config, is_split=True):
        """A column layer's B [r, out] is split as its weight's columns, a row layer's A [in, r] as its weight's
        rows: by the weight's own rule."""
        mappings = super()._get_tensor_parallel_mappings(config, is_split)
        for name in mappings:
            rule = _weight_rule(self.model, name.rsplit(".", 1)[0], config, is_split)
            if rule is not None:
                mappings[name] = rule
        return mappings

    def mark_only_lora_as_trainable(self) -> None:
        super().mark_only_lora_as_trainable()
        bias_trains = self.lora_config.trainable_bias in ("lora", "all")
        for layer in self.model.sublayers():
            if isinstance(layer, _ParallelLoRA):
                layer.lora_A.stop_gradient = layer.lora_B.stop_gradient = False
                if bias_trains and layer.bias is not None:
                    layer.bias.stop_gradient = False


ADAPTER_CONFIG, ADAPTER_WEIGHTS = "lora_config.json", "lora_model_state.pdparams"


def _family(model: paddle.nn.Layer):
    from .models import family_of

    return family_of(model.config)


def _default_targets(model: paddle.nn.Layer) -> List[str]:
    return list(_family(model).lora_targets)


def _weight_rule(model: paddle.nn.Layer, layer_name: str, config, is_split: bool) -> Optional[Callable]:
    """The model class's tensor-parallel rule for the weight of `layer_name` (its keys are under the base model)."""
    prefix = model.base_model_prefix + "."
    key = (layer_name[len(prefix):] if layer_name.startswith(prefix) else layer_name) + ".weight"
    return type(model)._get_tensor_parallel_mappings(config, is_split=is_split).get(key)


def _whole_weight_shape(model: paddle.nn.Layer, name: str, layer: nn.Layer) -> Tuple[int, int]:
    """[in, out] of a layer's whole weight, from this rank's shard joined by the weight's rule: a column layer's
    shards can be wider than 1/N of it (ChatGLM2's K/V groups replicated over ranks)."""
    fan_in, fan_out = (int(d) for d in layer.weight.shape)
    degree = tensor_parallel_degree(model.config)
    column = isinstance(layer, ColumnParallelLinear)
    if degree == 1 or not (column or isinstance(layer, RowParallelLinear)):
        return fan_in, fan_out
    join = _weight_rule(model, name, model.config, is_split=False)
    if join is None:
        return (fan_in, fan_out * degree) if column else (fan_in * degree, fan_out)
    joined = join([np.zeros([1, fan_out] if column else [fan_in, 1], dtype="float32")] * degree).shape
    return (fan_in, joined[-1]) if column else (joined[0], fan_out)


def _example_layer(model: paddle.nn.Layer) -> str:
    """The name of the model's first linear layer, to show what target patterns match."""
    return next((name for name, layer in model.named_sublayers() if type(layer).__name__.endswith("Linear")), "?")


def add_lora(model: paddle.nn.Layer, args) -> LoRAModel:
    """Wrap `model` with new adapters from `args` (ModelArguments), or the ones saved at `args.lora_path`; without
    --lora_target_modules the family's default targets get adapters."""
    targets = list(args.lora_target_modules or _default_targets(model))
    if args.lora_path:
        lora_model = load_adapter(model, args.lora_path)
    else:
        config = LoRAConfig(
            target_modules=targets, r=args.lora_rank, lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout, merge_weights=False,
            tensor_parallel_degree=model.config.tensor_parallel_degree, dtype=model.config.dtype,
        )
        lora_model = GLMLoRAModel(model, config)
    lora_model.mark_only_lora_as_trainable()
    trainable = sum(int(p.numel()) for p in lora_model.parameters() if not p.stop_gradient)
    if trainable == 0:
        raise InputError(
            f"--lora_target_modules {' '.join(targets)} matched no linear layer; names look like "
            f"{_example_layer(model)} (the default for this model is {' '.join(_default_targets(model))})"
        )
    total = sum(int(p.numel()) for p in lora_model.parameters())
    logger.info(f"LoRA: {trainable} of {total} parameters train ({100.0 * trainable / total:.3f}%)")
    return lora_model


@paddle.no_grad()
def merged_state_dict(lora_model: LoRAModel) -> Dict[str, paddle.Tensor]:
    """The base model's state dict with every adapter folded in: W + A @ B * scaling."""
    state = {k: v for k, v in lora_model.model.state_dict().items() if "lora_" not in k}
    for name, layer in lora_model.model.named_sublayers():
        if hasattr(layer, "lora_A") and not getattr(layer, "merged", False):
            state[f"{name}.weight"] = layer.weight + layer.lora_A @ layer.lora_B * layer.scaling
    return state


def load_with_adapter(model_name_or_path: str, lora_path: Optional[str] = None, **kwargs) -> paddle.nn.Layer:
    """The family's plain model (`kwargs` go to `from_pretrained`: a tensor-parallel rank's shard), with the adapter
    at `lora_path` folded into its weights."""
    from .models import load_model

    model = load_model(model_name_or_path, **kwargs)
    return merged_model(load_adapter(model, lora_path)) if lora_path else model


def merged_model(lora_model: LoRAModel) -> paddle.nn.Layer:
    """A plain model of the adapted model's class holding the base weights with the adapter folded in."""
    model = type(lora_model.model)(lora_model.model.config)
    model.set_state_dict(merged_state_dict(lora_model))
    return model


def load_adapter(model: paddle.nn.Layer, lora_path: str) -> LoRAModel:
    """`LoRAModel.from_pretrained`, after `check_adapter`: PaddleNLP would start from random adapters when the
    weights are missing and skip tensors whose shapes differ, with a log line at most."""
    check_adapter(model, lora_path)
    return GLMLoRAModel.from_pretrained(model, lora_path)


def check_adapter(model: paddle.nn.Layer, lora_path: str) -> None:
    """Raise an InputError naming `lora_path` and the mismatch when the adapter there cannot apply to `model`:
    no adapter files, target modules that match no layer, layers or tensor shapes that differ."""
    where = f"--lora_path {lora_path}"
    config_file = os.path.join(lora_path, ADAPTER_CONFIG)
    if not os.path.isdir(lora_path):
        raise InputError(f"{where}: no such directory")
    if not os.path.isfile(config_file):
        raise InputError(f"{where}: no {ADAPTER_CONFIG}, so not a LoRA adapter (training with --lora writes one)")
    with open(config_file, encoding="utf-8") as handle:
        try:
            config = json.load(handle)
        except json.JSONDecodeError as error:
            raise InputError(f"{where}: {ADAPTER_CONFIG} is not valid JSON ({error.msg})") from None
    patterns = config.get("target_modules") or []
    layers = {name: layer for name, layer in model.named_sublayers()
              if type(layer).__name__.endswith("Linear") and any(re.fullmatch(pattern, name) for pattern in patterns)}
    if not layers:
        raise InputError(f"{where}: its target_modules {patterns} match no linear layer of the model (names look "
                         f"like {_example_layer(model)}): an adapter of another model?")
    adapter_degree, model_degree = config.get("tensor_parallel_degree") or 1, tensor_parallel_degree(model.config)
    if adapter_degree > 1:
        return _check_adapter_shards(where, lora_path, adapter_degree, model_degree)
    weights = os.path.join(lora_path, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        if not os.path.isfile(os.path.join(lora_path, "peft_model.safetensors.index.json")):
            raise InputError(f"{where}: no {ADAPTER_WEIGHTS} (the adapter weights)")
        return  # safetensors shards: PaddleNLP checks their keys itself
    state = paddle.load(weights, return_numpy=True)
    rank = config.get("r", LoRAConfig().r)
    problems: List[str] = []
    for name, layer in layers.items():
        fan_in, fan_out = _whole_weight_shape(model, name, layer)  # the adapter is whole
        for part, shape in (("lora_A", [fan_in, rank]), ("lora_B", [rank, fan_out])):
            key = f"{name}.{part}"
            if key not in state:
                problems.append(f"no tensor {key}")
            elif list(state[key].shape) != shape:
                problems.append(f"{key} has shape {list(state[key].shape)} but the model needs {shape}")
    problems += [f"tensor {key} matches no layer of the model" for key in state
                 if key.endswith((".lora_A", ".lora_B")) and key.rsplit(".", 1)[0] not in layers]
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise InputError(f"{where} does not fit the model (an adapter of another model?): {shown}")


def _check_adapter_shards(where: str, lora_path: str, adapter_degree: int, model_degree: int) -> None:
    """PaddleNLP raises a bare NotImplementedError on another degree, and starts from random adapters when
    this rank's shard is missing."""
    if adapter_degree != model_degree:
        raise InputError(
            f"{where} holds an adapter split for {adapter_degree} tensor-parallel ranks but the model runs on "
            f"{model_degree}: run on {adapter_degree} ranks, or save it whole (fine-tune with --merge_tensor_parallel)")
    stem, extension = os.path.splitext(ADAPTER_WEIGHTS)
    missing = [name for name in (f"{stem}.tp{rank:0>2d}{extension}" for rank in range(adapter_degree))
               if not os.path.isfile(os.path.join(lora_path, name))]
    if missing:
        raise InputError(f"{where}: missing adapter shard(s) {', '.join(missing)}")
