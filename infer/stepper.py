"""The `Stepper` over an exported model: the K/V cache stays in the engine, in two segments, written in place.

- The prompt pass runs each prompt once (not once per beam or sample) into a buffer of its own length (after a
  prefix's slots); that buffer then is the *shared* segment, read by the k rows (beams, samples) that continue the
  prompt, once per step for all k (`models.layers.SegmentedCache`).
- Each decoding row owns `capacity` slots (the most new tokens); step t writes slot t in place.
- Beam search reorders only the rows' own slots (the engine gathers them); rows stay with their prompt.
- Masks and positions of every step are built once per batch in the capacity layout and sliced per step.
Nothing of the cache passes through numpy between steps (`infer.engines` says how each engine manages).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

from paddle_glm.inputs import model_positions, prefill_attention_mask

__all__ = ["ExportedStepper", "run_step", "prefix_heads"]


class ExportedStepper:
    """Runs the step graph of an export (`export_config.json` as `config`) for one left-padded prompt batch."""

    def __init__(self, engine, batch: Dict[str, np.ndarray], config: dict, capacity: int,
                 prefix: Optional[np.ndarray] = None):
        self.engine, self.batch, self.capacity = engine, batch, capacity
        self.layers, self.heads, self.head_dim = config["num_layers"], config["kv_heads"], config["head_dim"]
        self.prefix = prefix  # [layers, 2, P, kv_heads, head_dim] or None
        self.prefix_tokens = 0 if prefix is None else prefix.shape[2]
        self.shared: List = []  # per layer key, value [B, kv, P + S, hd]
        self.own: List = []  # per layer key, value [N, kv, capacity, hd]
        self.expand = 1
        self.steps = 0

    # ---------------------------------------------------------------- the Stepper protocol

    def prefill(self, expand: int) -> np.ndarray:
        batch = self.batch
        mask = prefill_attention_mask(batch["key_mask"], batch["sep"])
        logits, self.shared = self.run_prompt(batch["input_ids"], batch["position_ids"], mask)
        self.expand, self.steps = expand, 0
        rows = len(batch["input_ids"]) * expand
        self.own = [self.engine.buffer([rows, self.heads, self.capacity, self.head_dim])
                    for _ in range(2 * self.layers)]
        self._layout(expand)
        return np.repeat(logits, expand, axis=0)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        if self.steps >= self.capacity:
            raise ValueError(f"decode step {self.steps + 1} exceeds the {self.capacity} slots of this batch")
        t = self.steps
        logits = run_step(self.engine, tokens.astype("int64")[:, None], self.positions[t], self.masks[t], t, self.shared,
                           self.own)
        self.steps += 1
        return logits

    def reorder(self, index: np.ndarray) -> None:
        """New row i = old row index[i]; rows never leave their prompt (their shared segment)."""
        rows = np.arange(len(index))
        if not np.array_equal(index // self.expand, rows // self.expand):
            raise ValueError("reorder moves rows to another prompt's shared cache")
        if not np.array_equal(index, rows):
            self.own = self.engine.gather(self.own, index)

    # ---------------------------------------------------------------- the graph

    def run_prompt(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray):
        """The prompt pass of rows `input_ids` [B, S] (positions [B, P, S], mask [B, 1, S, S] over the prompt):
        (last-position logits [B, V], the filled buffers, per layer key and value [B, kv, prefix + S, hd])."""
        rows, length = input_ids.shape
        prefix = self.prefix_tokens
        # one masked column stands for the (empty) shared segment; a prefix's columns are open to every query
        columns = [np.zeros([rows, 1, length, 1], "float32"), np.ones([rows, 1, length, prefix], "float32")]
        mask = np.concatenate(columns + [attention_mask.astype("float32")], axis=-1)
        empty = self.engine.buffer([rows, self.heads, 1, self.head_dim])
        heads = prefix_heads(self.prefix, self.layers)
        filled = [self.engine.buffer([rows, self.heads, prefix + length, self.head_dim], head) for head in heads]
        logits = run_step(self.engine, input_ids.astype("int64"), model_positions(position_ids), mask, prefix,
                           [empty] * (2 * self.layers), filled)
        return logits, filled

    def _layout(self, expand: int) -> None:
        """Every decode step's positions [T][N, P, 1] and masks [T][N, 1, 1, K + T] (K = prefix + prompt)."""
        batch, capacity = self.batch, self.capacity
        rows = np.repeat(np.arange(len(batch["input_ids"])), expand)
        key_mask = batch["key_mask"][rows]
        shared = np.concatenate([np.ones([len(rows), self.prefix_tokens], "float32"), key_mask], axis=1)
        masks = np.zeros([capacity, len(rows), 1, 1, shared.shape[1] + capacity], "float32")
        masks[..., :shared.shape[1]] = shared[None, :, None, None, :]
        masks[..., shared.shape[1]:] = np.tril(np.ones([capacity, capacity], "float32"))[:, None, None, None, :]
        self.masks = masks
        last, step = batch["position_ids"][rows][:, :, -1], batch["position_step"][rows]  # (N, P)
        counts = np.arange(1, capacity + 1)[:, None, None]
        self.positions = [model_positions(p[:, :, None]) for p in last[None] + counts * step[None]]


def run_step(engine, input_ids, position_ids, attention_mask, start: int, shared: List, own: List,
             logit_index: Optional[np.ndarray] = None) -> np.ndarray:
    """One call of the step graph: the new tokens' ids [N, q], positions, mask [N, 1, q, K + C] and the slot
    `start` where their keys and values go; `shared` / `own` hold each layer's key and value buffers in turn.
    Logits [M, V] of the positions `logit_index` (flat over the N * q tokens; default: each row's last)."""
    rows, length = input_ids.shape
    if logit_index is None:
        logit_index = np.arange(rows, dtype="int64") * length + length - 1
    feeds = {"input_ids": np.ascontiguousarray(input_ids), "position_ids": np.ascontiguousarray(position_ids),
             "attention_mask": np.ascontiguousarray(attention_mask), "cache_index": np.array([start], dtype="int64"),
             "logit_index": np.asarray(logit_index, dtype="int64")}
    cache = [buffer for layer in range(len(own) // 2)
             for buffer in (shared[2 * layer], shared[2 * layer + 1], own[2 * layer], own[2 * layer + 1])]
    return engine.run(feeds, cache)


def prefix_heads(prefix: Optional[np.ndarray], layers: int) -> List[Optional[np.ndarray]]:
    """A P-Tuning prefix [layers, 2, P, kv_heads, head_dim] as the heads of each layer's key and value buffer,
    [1, kv_heads, P, head_dim] each (`engine.buffer(shape, head)`); None per buffer without a prefix."""
    if prefix is None:
        return [None] * (2 * layers)
    return [prefix[layer, kind].transpose(1, 0, 2)[None] for layer in range(layers) for kind in (0, 1)]
