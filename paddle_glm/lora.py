"""LoRA adapters through `paddlenlp.peft`, configured from the command line (the reference hard-codes r=4)."""
from __future__ import annotations

from typing import Dict, Optional

import paddle
from paddlenlp.utils.log import logger
from paddlenlp.peft import LoRAConfig, LoRAModel

__all__ = ["add_lora", "merged_state_dict", "load_with_adapter"]


def add_lora(model: paddle.nn.Layer, args) -> LoRAModel:
    """Wrap `model` with new adapters from `args` (ModelArguments), or the ones saved at `args.lora_path`."""
    if args.lora_path:
        lora_model = LoRAModel.from_pretrained(model, args.lora_path)
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
        raise ValueError(
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
    if lora_path:
        lora_model = LoRAModel.from_pretrained(model, lora_path)
        model = GLMForConditionalGeneration(lora_model.model.config)
        model.set_state_dict(merged_state_dict(lora_model))
    return model
