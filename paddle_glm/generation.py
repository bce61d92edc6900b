"""Generation with our dynamic-graph GLM: a `Stepper` over the model's K/V cache.

`paddle_glm.decoding` owns every decoding strategy; this module only turns "prompt batch" and
"one more token per row" into model calls, keeping GLM's generation semantics: generated tokens
keep row 0 of their position ids at the `[gMASK]` position and count row 1 as 2, 3, ...
(`<|startofpiece|>` has 1).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import paddle

from .decoding import DecodingConfig, GenerationResult, generate as decode
from .inputs import Example, generation_batch, prefill_attention_mask
from .model import KVCache

__all__ = ["DygraphStepper", "generate"]


class DygraphStepper:
    """Runs a `GLMForConditionalGeneration` prompt batch and its decode steps."""

    def __init__(self, model: paddle.nn.Layer, batch: Dict[str, np.ndarray]):
        self.model = model
        self.batch = batch
        self.cache: Optional[KVCache] = None
        self.key_mask = self.mask_positions = None
        self.block_position = 1

    def prefill(self, expand: int) -> np.ndarray:
        rows = np.repeat(np.arange(len(self.batch["input_ids"])), expand)
        input_ids, position_ids, key_mask = (self.batch[k][rows] for k in ("input_ids", "position_ids", "key_mask"))
        self.key_mask, self.mask_positions, self.block_position = key_mask, position_ids[:, 0, -1], 1
        return self._run(input_ids, position_ids, prefill_attention_mask(key_mask))

    def step(self, tokens: np.ndarray) -> np.ndarray:
        self.block_position += 1
        self.key_mask = np.concatenate([self.key_mask, np.ones([len(tokens), 1], dtype="float32")], axis=1)
        positions = np.stack([self.mask_positions, np.full_like(self.mask_positions, self.block_position)], axis=1)
        return self._run(tokens[:, None], positions[:, :, None], self.key_mask[:, None, None, :])

    def reorder(self, index: np.ndarray) -> None:
        index_tensor = paddle.to_tensor(index, dtype="int64")
        self.cache = [(k.index_select(index_tensor, 0), v.index_select(index_tensor, 0)) for k, v in self.cache]
        self.key_mask, self.mask_positions = self.key_mask[index], self.mask_positions[index]

    def _run(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        output = self.model(
            paddle.to_tensor(input_ids, dtype="int64"),
            paddle.to_tensor(position_ids, dtype="int64"),
            paddle.to_tensor(attention_mask, dtype="float32"),
            cache=self.cache,
            num_logits_to_keep=1,
        )
        self.cache = output.past_key_values
        return output.logits[:, -1].astype("float32").numpy()


def generate(model: paddle.nn.Layer, prompts: List[Example], config: DecodingConfig) -> GenerationResult:
    """Decode GLM prompts (from `inputs.generation_example`) with the one decoding implementation."""
    was_training = model.training
    model.eval()
    try:
        with paddle.no_grad():
            batch = generation_batch(prompts, config.pad_token_id)
            return decode(DygraphStepper(model, batch), len(prompts), config)
    finally:
        if was_training:
            model.train()
