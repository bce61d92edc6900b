"""Batches of examples of any family (`models.family.Template` makes them): training batches padded on the right,
generation batches on the left, and the masks of a left-padded prompt batch. No paddle import: runners use it too.

A training batch is padded only to its own longest example (the reference pads everything to src_length +
tgt_length); pads sit after the answer where no real token can see them. A generation batch is padded on the left
so every prompt ends at the same column and decode steps append in lockstep; its pads are hidden by `key_mask`.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

__all__ = ["Example", "Collator", "generation_batch", "prefill_attention_mask", "model_positions"]

Example = Dict[str, np.ndarray]


class Collator:
    """Right-pads examples to the longest in the batch (never to a fixed length)."""

    _PAD_VALUES = {"labels": 0, "loss_mask": 0.0, "position_ids": 0}

    def __init__(self, pad_token_id: int, return_tensors: str = "pd", pad_to_multiple_of: Optional[int] = None):
        self.pad_token_id = pad_token_id
        self.return_tensors = return_tensors
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: List[Example]) -> Dict[str, object]:
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {}
        for key in features[0]:
            values = [np.asarray(f[key]) for f in features]
            if values[0].ndim == 0:
                batch[key] = np.stack(values)
            else:
                pad_value = self._PAD_VALUES.get(key, self.pad_token_id)
                batch[key] = np.stack([_pad_right(v, length, pad_value) for v in values])
        if "position_ids" in batch:
            batch["position_ids"] = model_positions(batch["position_ids"])
        if self.return_tensors == "pd":
            import paddle

            return {key: paddle.to_tensor(value) for key, value in batch.items()}
        return batch


def model_positions(position_ids: np.ndarray) -> np.ndarray:
    """[B, P, S] as models take them: [B, 2, S] for 2-D positions, [B, S] for 1-D ones (ChatGLM2/3)."""
    return position_ids if position_ids.shape[1] > 1 else position_ids[:, 0]


def _pad_right(array: np.ndarray, length: int, value) -> np.ndarray:
    widths = [(0, 0)] * (array.ndim - 1) + [(0, length - array.shape[-1])]
    return np.pad(array, widths, constant_values=value)


def generation_batch(prompts: List[Example], pad_token_id: int) -> Dict[str, np.ndarray]:
    """Left-pads generation prompts (`Template.generation_example`): `input_ids` [B, S], `position_ids` [B, P, S],
    `key_mask` [B, S] (0 on pads), `sep` [B] (each bidirectional prefix's end, in batch columns) and
    `position_step` [B, P]."""
    length = max(len(p["input_ids"]) for p in prompts)
    rows = np.asarray(prompts[0]["position_ids"]).shape[0]
    input_ids = np.full([len(prompts), length], pad_token_id, dtype="int64")
    position_ids = np.zeros([len(prompts), rows, length], dtype="int64")
    key_mask = np.zeros([len(prompts), length], dtype="float32")
    sep = np.zeros([len(prompts)], dtype="int64")
    for row, prompt in enumerate(prompts):
        n = len(prompt["input_ids"])
        input_ids[row, length - n:] = prompt["input_ids"]
        position_ids[row, :, length - n:] = prompt["position_ids"]
        key_mask[row, length - n:] = 1.0
        sep[row] = length - n + int(prompt["attention_mask"])
    step = np.stack([np.asarray(p["position_step"], dtype="int64") for p in prompts])
    return {"input_ids": input_ids, "position_ids": position_ids, "key_mask": key_mask, "sep": sep,
            "position_step": step}


def prefill_attention_mask(key_mask: np.ndarray, sep: np.ndarray) -> np.ndarray:
    """Dense mask [B, 1, S, S] of a left-padded prompt batch: key j is visible to query i when it is no pad and
    lies in the bidirectional prefix (j < sep) or not after i. Each query also sees itself, so pad rows keep a
    finite softmax."""
    batch, length = key_mask.shape
    columns = np.arange(length)
    visible = (columns[None, None, :] < sep[:, None, None]) | (columns[None, None, :] <= columns[None, :, None])
    mask = (visible & (key_mask[:, None, :] > 0)).astype("float32")  # (B, S, S)
    mask[:, columns, columns] = 1.0
    return mask[:, None]
