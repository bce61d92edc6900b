"""GLM blank-infilling inputs: sources and targets -> token ids, 2-D positions, masks, labels.

Layout of one example (GLM's generation format, as THUDM's GLM and PaddleNLP's example use it):

    part A (bidirectional):  [CLS] source... [gMASK] <|endoftext|>
    part B (causal):         <|startofpiece|> target...            (training)
                             <|startofpiece|>                      (generation prompt)
    labels on part B:        target... <|endofpiece|>

Position ids are GLM's 2-D block positions: row 0 counts 0, 1, ... over part A and stays at the
`[gMASK]` position over part B; row 1 is 0 over part A and counts 1, 2, ... over part B. The
attention mask of one example is its part-A length ("sep"): keys before it are visible to all,
part B is causal. A training batch is padded on the right, only to its own longest example (the
reference pads everything to src_length + tgt_length); pads sit after part B where no real
token can see them. A generation batch is padded on the left so every prompt ends at the same
column and decode steps append in lockstep; its pads are hidden by `key_mask`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

__all__ = [
    "GLMSpecialIds", "build_source_ids", "training_example", "generation_example", "GLMCollator",
    "generation_batch", "prefill_attention_mask", "padded_training_example",
]

Example = Dict[str, object]


@dataclass(frozen=True)
class GLMSpecialIds:
    """The special token ids GLM's infilling format needs."""

    pad: int
    cls: int
    eos: int
    sop: int
    eop: int
    gmask: int
    mask_ids: tuple  # every id that marks a blank ([MASK], [sMASK], [gMASK]); the first one found anchors part B

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "GLMSpecialIds":
        masks = (tokenizer.mask_token_id, tokenizer.smask_token_id, tokenizer.gmask_token_id)
        return cls(
            pad=tokenizer.pad_token_id, cls=tokenizer.cls_token_id, eos=tokenizer.eos_token_id,
            sop=tokenizer.sop_token_id, eop=tokenizer.eop_token_id, gmask=tokenizer.gmask_token_id,
            mask_ids=tuple(m for m in masks if m is not None),
        )


def build_source_ids(
    text_ids: Sequence[int], special: GLMSpecialIds, max_length: int, truncation_side: str = "right"
) -> List[int]:
    """`[CLS] text [gMASK] <|endoftext|>` in at most `max_length` ids.

    An over-long text loses its end (`truncation_side="right"`, the default: prompts put the
    instruction or answer first) or its beginning (`"left"`).
    """
    room = max_length - 3
    if room < 1:
        raise ValueError(f"max source length {max_length} leaves no room for text: it must be at least 4")
    if truncation_side not in ("right", "left"):
        raise ValueError(f"truncation_side must be 'right' or 'left', got {truncation_side!r}")
    text_ids = list(text_ids)
    if len(text_ids) > room:
        text_ids = text_ids[:room] if truncation_side == "right" else text_ids[-room:]
    return [special.cls] + text_ids + [special.gmask, special.eos]


def _mask_position(source_ids: Sequence[int], special: GLMSpecialIds) -> int:
    for index, token in enumerate(source_ids):
        if token in special.mask_ids:
            return index
    raise ValueError("the source has no [MASK], [sMASK] or [gMASK] token: build it with build_source_ids")


def training_example(
    source_ids: Sequence[int], target_ids: Sequence[int], special: GLMSpecialIds, max_target_length: int
) -> Example:
    """One training example; the target keeps its first `max_target_length - 1` ids (+ eop)."""
    target = list(target_ids)[: max_target_length - 1]
    sep = len(source_ids)
    mask_pos = _mask_position(source_ids, special)
    part_b = len(target) + 1
    return {
        "input_ids": np.array(list(source_ids) + [special.sop] + target, dtype="int64"),
        "position_ids": np.array(
            [list(range(sep)) + [mask_pos] * part_b, [0] * sep + list(range(1, part_b + 1))], dtype="int64"
        ),
        "attention_mask": np.array(sep, dtype="int64"),
        "labels": np.array([0] * sep + target + [special.eop], dtype="int64"),
        "loss_mask": np.array([0] * sep + [1] * part_b, dtype="float32"),
    }


def padded_training_example(
    source_ids: Sequence[int], target_ids: Sequence[int], special: GLMSpecialIds, src_length: int, tgt_length: int
) -> Example:
    """The same example in PaddleNLP's reference layout, to compare against (tests, `bench/`).

    The reference example pads part A to `src_length` and part B to `tgt_length`, passes a dense
    [1, S, S] 0/1 attention mask (as its tokenizer's `build_inputs_for_generation` makes it) and a
    float `loss_mask` over all S positions; its model projects every position to the vocabulary.
    """
    target = list(target_ids)[: tgt_length - 1]
    sep = len(source_ids)
    if sep > src_length:
        raise ValueError(f"the source has {sep} ids, more than src_length {src_length}")
    length = src_length + tgt_length
    part_b = [special.sop] + target + [special.eop] + [special.pad] * (tgt_length - len(target) - 1)  # tgt + 1
    mask = np.zeros([length, length], dtype="int64")
    mask[:, :sep] = 1  # part A, without its pads, is visible to every query
    mask[src_length:, src_length:] = np.tril(np.ones([tgt_length, tgt_length], dtype="int64"))
    mask_pos = _mask_position(source_ids, special)
    return {
        "input_ids": np.array(list(source_ids) + [special.pad] * (src_length - sep) + part_b[:-1], dtype="int64"),
        "position_ids": np.array(
            [list(range(src_length)) + [mask_pos] * tgt_length, [0] * src_length + list(range(1, tgt_length + 1))],
            dtype="int64",
        ),
        "attention_mask": mask[None],
        "labels": np.array([0] * src_length + part_b[1:], dtype="int64"),
        "loss_mask": np.array([0] * src_length + [1] * (len(target) + 1) + [0] * (tgt_length - len(target) - 1),
                              dtype="float32"),
    }


def generation_example(source_ids: Sequence[int], special: GLMSpecialIds) -> Example:
    """The prompt for generation: the source followed by `<|startofpiece|>`."""
    sep = len(source_ids)
    return {
        "input_ids": np.array(list(source_ids) + [special.sop], dtype="int64"),
        "position_ids": np.array(
            [list(range(sep)) + [_mask_position(source_ids, special)], [0] * sep + [1]], dtype="int64"
        ),
        "attention_mask": np.array(sep, dtype="int64"),
    }


class GLMCollator:
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
        if self.return_tensors == "pd":
            import paddle

            return {key: paddle.to_tensor(value) for key, value in batch.items()}
        return batch


def _pad_right(array: np.ndarray, length: int, value) -> np.ndarray:
    widths = [(0, 0)] * (array.ndim - 1) + [(0, length - array.shape[-1])]
    return np.pad(array, widths, constant_values=value)


def generation_batch(prompts: List[Example], pad_token_id: int) -> Dict[str, np.ndarray]:
    """Left-pads generation prompts: `input_ids` [B, S], `position_ids` [B, 2, S], `key_mask` [B, S].

    Every prompt then ends with its `<|startofpiece|>` in the last column, so part A of every
    row is the first S - 1 columns (minus its pads, which `key_mask` hides).
    """
    length = max(len(p["input_ids"]) for p in prompts)
    input_ids = np.full([len(prompts), length], pad_token_id, dtype="int64")
    position_ids = np.zeros([len(prompts), 2, length], dtype="int64")
    key_mask = np.zeros([len(prompts), length], dtype="float32")
    for row, prompt in enumerate(prompts):
        n = len(prompt["input_ids"])
        input_ids[row, length - n:] = prompt["input_ids"]
        position_ids[row, :, length - n:] = prompt["position_ids"]
        key_mask[row, length - n:] = 1.0
    return {"input_ids": input_ids, "position_ids": position_ids, "key_mask": key_mask}


def prefill_attention_mask(key_mask: np.ndarray) -> np.ndarray:
    """Dense mask [B, 1, S, S] for a left-padded prompt batch whose last column is part B.

    Part A (all columns but the last) is visible to every query except where padded; the last
    column (`<|startofpiece|>`) sees itself. Each query also sees itself, so pad rows keep a
    finite softmax.
    """
    batch, length = key_mask.shape
    mask = np.repeat(key_mask[:, None, :], length, axis=1)  # (B, S, S)
    mask[:, :, -1] = 0.0
    mask[:, np.arange(length), np.arange(length)] = 1.0
    return mask[:, None]
