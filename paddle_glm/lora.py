"""LoRA adapters through `paddlenlp.peft`, configured from the command line (the reference hard-codes r=4)."""
from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Optional

import paddle
from paddlenlp.utils.log import logger
from paddlenlp.peft import LoRAConfig, LoRAModel

from .args import InputError

__all__ = ["add_lora", "merged_state_dict", "merged_model", "load_with_adapter", "load_adapter", "check_adapter"]

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "lora_config.json", "lora_model_state.pdparams"


def add_lora(model: paddle.nn.Layer, args) -> LoRAModel:
    """Wrap `model` with new adapters from `args` (ModelArguments), or the ones saved at `args.lora_path`."""
    if args.lora_path:
        lora_model = load_adapter(model, args.lora_path)
    else:
        config = LoRAConfig(
            target_modules=list(args.lora_target_modules), r=args.lora_rank, lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout, merge_weights=False,
            tensor_parallel_degree=model.config.tensor_parallel_degree, dtype=model.config.dtype,
        )
        lora_model = LoRAModel(model, config)
    lora_model.mark_only_lora_as_trainable()
    trainable = sum(int(p.numel()) for p in lora_model.parameters() if not p.stop_gradient)
    if trainable == 0:
        raise InputError(
            f"--lora_target_modules {' '.join(args.lora_target_modules)} matched no linear layer; names look like "
            "glm.transformer.layers.0.attention.query_key_value (try '.*query_key_value.*')"
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


def load_with_adapter(model_name_or_path: str, lora_path: Optional[str] = None) -> paddle.nn.Layer:
    """A plain `GLMForConditionalGeneration`, with the adapter at `lora_path` folded into its weights."""
    from .model import GLMForConditionalGeneration

    model = GLMForConditionalGeneration.from_pretrained(model_name_or_path)
    return merged_model(load_adapter(model, lora_path)) if lora_path else model


def merged_model(lora_model: LoRAModel) -> paddle.nn.Layer:
    """A plain `GLMForConditionalGeneration` holding the base weights with the adapter folded in."""
    from .model import GLMForConditionalGeneration

    model = GLMForConditionalGeneration(lora_model.model.config)
    model.set_state_dict(merged_state_dict(lora_model))
    return model


def load_adapter(model: paddle.nn.Layer, lora_path: str) -> LoRAModel:
    """`LoRAModel.from_pretrained`, after `check_adapter`: PaddleNLP would start from random adapters when the
    weights are missing and skip tensors whose shapes differ, with a log line at most."""
    check_adapter(model, lora_path)
    return LoRAModel.from_pretrained(model, lora_path)


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
                         "like glm.transformer.layers.0.attention.query_key_value): an adapter of another model?")
    tensor_parallel = max(config.get("tensor_parallel_degree") or -1, model.config.tensor_parallel_degree or -1) > 1
    weights = os.path.join(lora_path, ADAPTER_WEIGHTS)
    if tensor_parallel or not os.path.isfile(weights):
        if not tensor_parallel and not os.path.isfile(os.path.join(lora_path, "peft_model.safetensors.index.json")):
            raise InputError(f"{where}: no {ADAPTER_WEIGHTS} (the adapter weights)")
        return  # sharded adapters: PaddleNLP splits or checks them itself
    state = paddle.load(weights, return_numpy=True)
    rank = config.get("r", LoRAConfig().r)
    problems: List[str] = []
    for name, layer in layers.items():
        fan_in, fan_out = (int(d) for d in layer.weight.shape)
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
