"""Generation positions and masks for any engine that runs a model with a K/V cache: the base of every `Stepper`.

Decoding (`paddle_glm.decoding`) feeds one token per row; this class turns that into model inputs for any family:
a generated token's position is the previous one plus the batch's `position_step` (GLM and ChatGLM-6B keep the
mask position and count the block position; ChatGLM2/3 count up), and it sees the prompt (minus its left padding)
and every token generated before it. Engines (dynamic graph, Paddle Inference, ONNX Runtime, FastDeploy) only
implement `_forward` and `_reorder_cache`. No paddle import: the runners use it too.
"""
from __future__ import annotations

from typing import Dict

import numpy as np

from .inputs import model_positions, prefill_attention_mask

__all__ = ["CachedStepper"]


class CachedStepper:
    """Holds a left-padded prompt batch (`inputs.generation_batch`) and the per-row decoding state."""

    def __init__(self, batch: Dict[str, np.ndarray]):
        self.batch = batch
        self.key_mask = self.positions = self.position_step = None

    def prefill(self, expand: int) -> np.ndarray:
        rows = np.repeat(np.arange(len(self.batch["input_ids"])), expand)
        input_ids, position_ids, key_mask, sep, step = (
            self.batch[k][rows] for k in ("input_ids", "position_ids", "key_mask", "sep", "position_step"))
        self.key_mask, self.positions, self.position_step = key_mask, position_ids[:, :, -1], step
        return self._forward(input_ids, model_positions(position_ids), prefill_attention_mask(key_mask, sep),
                             prefill=True)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        self.positions = self.positions + self.position_step
        self.key_mask = np.concatenate([self.key_mask, np.ones([len(tokens), 1], dtype="float32")], axis=1)
        return self._forward(tokens[:, None], model_positions(self.positions[:, :, None]),
                             self.key_mask[:, None, None, :], prefill=False)

    def reorder(self, index: np.ndarray) -> None:
        self._reorder_cache(index)
        self.key_mask, self.positions, self.position_step = (
            self.key_mask[index], self.positions[index], self.position_step[index])

    def _forward(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
                 prefill: bool) -> np.ndarray:
        """Run the model on the new tokens with the cache, keep the new cache; last-position logits [N, V]."""
        raise NotImplementedError

    def _reorder_cache(self, index: np.ndarray) -> None:
        raise NotImplementedError
