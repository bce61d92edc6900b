"""GLM's generation semantics for any engine that runs the model: the base of every `Stepper`.

Decoding (`paddle_glm.decoding`) feeds one token per row; this class turns that into GLM model
inputs. Generated tokens keep row 0 of their position ids at the `[gMASK]` position and count
row 1 as 2, 3, ... (`<|startofpiece|>` has 1); each new token sees the prompt (minus its left
padding) and every token generated before it. Engines (dynamic graph, Paddle Inference, ONNX
Runtime) only implement `_forward` and `_reorder_cache`. No paddle import: the runners use it too.
"""
from __future__ import annotations

from typing import Dict

import numpy as np

from .inputs import prefill_attention_mask

__all__ = ["GLMStepper"]


class GLMStepper:
    """Holds a left-padded prompt batch (`inputs.generation_batch`) and the per-row decoding state."""

    def __init__(self, batch: Dict[str, np.ndarray]):
        self.batch = batch
        self.key_mask = self.mask_positions = None
        self.block_position = 1

    def prefill(self, expand: int) -> np.ndarray:
        rows = np.repeat(np.arange(len(self.batch["input_ids"])), expand)
        input_ids, position_ids, key_mask = (self.batch[k][rows] for k in ("input_ids", "position_ids", "key_mask"))
        self.key_mask, self.mask_positions, self.block_position = key_mask, position_ids[:, 0, -1], 1
        return self._forward(input_ids, position_ids, prefill_attention_mask(key_mask), prefill=True)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        self.block_position += 1
        self.key_mask = np.concatenate([self.key_mask, np.ones([len(tokens), 1], dtype="float32")], axis=1)
        positions = np.stack([self.mask_positions, np.full_like(self.mask_positions, self.block_position)], axis=1)
        return self._forward(tokens[:, None], positions[:, :, None], self.key_mask[:, None, None, :], prefill=False)

    def reorder(self, index: np.ndarray) -> None:
        self._reorder_cache(index)
        self.key_mask, self.mask_positions = self.key_mask[index], self.mask_positions[index]

    def _forward(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
                 prefill: bool) -> np.ndarray:
        """Run the model on the new tokens with the cache, keep the new cache; last-position logits [N, V]."""
        raise NotImplementedError

    def _reorder_cache(self, index: np.ndarray) -> None:
        raise NotImplementedError
