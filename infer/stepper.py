"""The `Stepper` over an exported model: positions and masks from `CachedStepper`, the cache as one numpy array."""
from __future__ import annotations

from typing import Dict

import numpy as np

from paddle_glm.stepper import CachedStepper

__all__ = ["ExportedStepper"]


class ExportedStepper(CachedStepper):
    """Runs the prefill graph once, then the decode graph per token; beams reorder the cache rows."""

    def __init__(self, engine, batch: Dict[str, np.ndarray], cache_dtype: str = "float32"):
        super().__init__(batch)
        self.engine = engine
        self.cache = None  # [layers, 2, rows, tokens, kv_heads, head_dim]
        self.cache_dtype = cache_dtype

    def _forward(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
                 prefill: bool) -> np.ndarray:
        feeds = {
            "input_ids": input_ids.astype("int64"),
            "position_ids": position_ids.astype("int64"),
            "attention_mask": attention_mask.astype("float32"),
        }
        if not prefill:
            feeds["cache"] = self.cache
        logits, self.cache = self.engine.run("prefill" if prefill else "decode", feeds)
        return logits

    def _reorder_cache(self, index: np.ndarray) -> None:
        self.cache = self.cache[:, :, index]
