"""Generation in dynamic graph: a `Stepper` over the K/V cache of any family's model.

`paddle_glm.decoding` owns every decoding strategy and `paddle_glm.stepper` the positions and masks; this module
only runs the model on them and keeps its K/V cache as Paddle tensors.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import paddle

from .decoding import DecodingConfig, GenerationResult, generate as decode
from .inputs import Example, generation_batch
from .models.layers import KVCache
from .stepper import CachedStepper

__all__ = ["DygraphStepper", "generate"]


class DygraphStepper(CachedStepper):
    """Runs a model's prompt batch and its decode steps in dynamic graph."""

    def __init__(self, model: paddle.nn.Layer, batch: Dict[str, np.ndarray]):
        super().__init__(batch)
        self.model = model
        self.cache: Optional[KVCache] = None

    def _forward(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
                 prefill: bool) -> np.ndarray:
        output = self.model(
            paddle.to_tensor(input_ids, dtype="int64"),
            paddle.to_tensor(position_ids, dtype="int64"),
            paddle.to_tensor(attention_mask, dtype="float32"),
            cache=None if prefill else self.cache,
            num_logits_to_keep=1,
        )
        self.cache = output.past_key_values
        return output.logits[:, -1].astype("float32").numpy()

    def _reorder_cache(self, index: np.ndarray) -> None:
        index_tensor = paddle.to_tensor(index, dtype="int64")
        self.cache = [(k.index_select(index_tensor, 0), v.index_select(index_tensor, 0)) for k, v in self.cache]


def generate(model: paddle.nn.Layer, prompts: List[Example], config: DecodingConfig) -> GenerationResult:
    """Decode prompts (from `Template.generation_example`) with the one decoding implementation."""
    was_training = model.training
    model.eval()
    try:
        with paddle.no_grad():
            batch = generation_batch(prompts, config.pad_token_id)
            return decode(DygraphStepper(model, batch), len(prompts), config)
    finally:
        if was_training:
            model.train()
