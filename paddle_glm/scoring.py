"""Log-likelihood of continuations after a prompt, for every family: the one scoring function of benchmark evaluation.

`Scorer.loglikelihood(prompt_ids, continuations)` is what lm-evaluation-harness asks of a model: for each continuation
(token ids), the summed log-probability of its tokens after the prompt. The sequence scored is the family's training
layout (`Template.training_example`): prompt, `answer_start` (GLM's and ChatGLM-6B's `<sop>`), continuation, with
the family's positions and bidirectional prefix. GLM thus scores a choice by blank infilling (the prompt ends with
`[gMASK]`, the choice fills part B) and ChatGLM2/3 as a causal continuation, with no family branch here.

Shared-prefix batching (`Scorer.score` over a subject's items): tokens whose keys and values cannot depend on what
follows them run once, and their K/V cache serves everything after them:
- per item: the prompt and `answer_start`, shared by every choice. The choices' first tokens are read off the
  logits of its last position; only the rest of longer continuations runs again, over the item's cache;
- per subject: the longest token prefix common to all items (header and shots), when the family's attention makes
  it causal (ChatGLM2/3). GLM's and ChatGLM-6B's prompts are bidirectional: every prompt token sees the question, so
  the shots' keys and values depend on it and only the per-item sharing is exact.
Rows of different lengths are packed with pads in the middle (after the shared prefix) or at the end and masked by a
dense [B, 1, q, cache + q] mask; positions come from the template, so pads never shift them. Without sharing
(`shared_prefix=False`) every (item, choice) runs whole: the baseline of `bench/bench_eval.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import paddle

from .inputs import model_positions
from .models.family import Template
from .models.layers import KVCache

__all__ = ["Request", "Scorer"]


@dataclass(frozen=True)
class Request:
    """A prompt and the continuations to score after it (token ids)."""

    prompt_ids: Sequence[int]
    continuations: Sequence[Sequence[int]]


@dataclass
class _Layout:
    """A request in the family's layout: the part its continuations share (`opened`: prompt + answer_start) and each
    continuation's ids and positions."""

    opened: np.ndarray  # [n]
    opened_positions: np.ndarray  # [P, n]
    sep: int  # bidirectional prefix length (0: causal)
    continuations: List[np.ndarray]  # [m_j] each
    continuation_positions: List[np.ndarray]  # [P, m_j] each


class Scorer:
    """Scores continuations with a model of any family, batched, with or without shared-prefix caching."""

    def __init__(self, model: paddle.nn.Layer, template: Template, batch_size: int = 8, shared_prefix: bool = True):
        self.model = model
        self.template = template
        self.batch_size = batch_size
        self.shared_prefix = shared_prefix

    def loglikelihood(self, prompt_ids: Sequence[int], continuations: Sequence[Sequence[int]]) -> List[float]:
        """Summed log-probability of each continuation's tokens after the prompt."""
        return self.score([Request(prompt_ids, continuations)])[0]

    def score(self, requests: Sequence[Request], progress: Optional[Callable[[int], None]] = None
              ) -> List[List[float]]:
        """`loglikelihood` of each request; requests that share a prefix (a subject's header and shots) share its
        cache when the family allows it. `progress(n)` is told when n more requests are done."""
        layouts = [self._layout(request) for request in requests]
        progress = progress or (lambda done: None)
        with paddle.no_grad():
            if self.shared_prefix:
                return self._score_shared(layouts, progress)
            return self._score_each(layouts, progress)

    # ---------------------------------------------------------------- layout

    def _layout(self, request: Request) -> _Layout:
        if not request.continuations or any(len(c) == 0 for c in request.continuations):
            raise ValueError("every request needs at least one continuation, and continuations need tokens")
        examples = [self.template.training_example(request.prompt_ids, c, len(c) + 1) for c in request.continuations]
        opened = len(examples[0]["input_ids"]) - len(request.continuations[0])
        return _Layout(
            opened=examples[0]["input_ids"][:opened], opened_positions=examples[0]["position_ids"][:, :opened],
            sep=int(examples[0]["attention_mask"]),
            continuations=[e["input_ids"][opened:] for e in examples],
            continuation_positions=[e["position_ids"][:, opened:] for e in examples],
        )

    # ---------------------------------------------------------------- every (item, choice) whole

    def _score_each(self, layouts: List[_Layout], progress: Callable[[int], None]) -> List[List[float]]:
        rows = [(i, j) for i, layout in enumerate(layouts) for j in range(len(layout.continuations))]
        scores = [[0.0] * len(layout.continuations) for layout in layouts]
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            sequences, targets = [], []
            for i, j in chunk:
                layout = layouts[i]
                ids = np.concatenate([layout.opened, layout.continuations[j]])
                positions = np.concatenate([layout.opened_positions, layout.continuation_positions[j]], axis=1)
                sequences.append((ids[:-1], positions[:, :-1], layout.sep))  # the last token predicts nothing
                targets.append(layout.continuations[j])
            keep = max(len(t) for t in targets)  # rows are left-padded: every target sits in the last `keep` columns
            ids, positions, key_mask, sep_columns = _left_padded(sequences, self.template.pad_id)
            logits, _ = self._run(ids, positions, key_mask, sep_columns, None, keep)
            wanted = np.zeros([len(chunk), keep, 1], dtype="int64")
            for row, target in enumerate(targets):
                wanted[row, keep - len(target):, 0] = target
            logprobs = _token_logprobs(logits, wanted)[..., 0]  # (rows, keep)
            for row, ((i, j), target) in enumerate(zip(chunk, targets)):
                scores[i][j] = float(logprobs[row, keep - len(target):].sum())
            progress(sum(j == len(layouts[i].continuations) - 1 for i, j in chunk))
        return scores

    # ---------------------------------------------------------------- shared prefixes

    def _score_shared(self, layouts: List[_Layout], progress: Callable[[int], None]) -> List[List[float]]:
        prefix = _shared_prefix(layouts)
        cache = None
        if prefix:
            first = layouts[0]
            cache = self._run(first.opened[None, :prefix], first.opened_positions[None, :, :prefix],
                              np.ones([1, prefix], dtype="float32"), np.array([first.sep]), None, 1)[1]
        scores: List[List[float]] = []
        for start in range(0, len(layouts), self.batch_size):
            scores += self._score_items(layouts[start:start + self.batch_size], prefix, cache)
            progress(len(scores) - start)
        return scores

    def _score_items(self, layouts: List[_Layout], prefix: int, prefix_cache: Optional[KVCache]) -> List[List[float]]:
        """One batch of items over the subject's prefix cache: their prompts once, then their longer continuations."""
        batch = len(layouts)
        rests = [(layout.opened[prefix:], layout.opened_positions[:, prefix:], layout.sep) for layout in layouts]
        ids, positions, rest_mask, sep_columns = _left_padded(rests, self.template.pad_id, prefix)
        key_mask = np.concatenate([np.ones([batch, prefix], dtype="float32"), rest_mask], axis=1)
        cache = [(k.expand([batch] + k.shape[1:]), v.expand([batch] + v.shape[1:])) for k, v in prefix_cache] \
            if prefix_cache else None
        logits, cache = self._run(ids, positions, key_mask, sep_columns, cache, 1)
        choices = max(len(layout.continuations) for layout in layouts)
        firsts = np.zeros([batch, 1, choices], dtype="int64")
        for row, layout in enumerate(layouts):
            firsts[row, 0, :len(layout.continuations)] = [c[0] for c in layout.continuations]
        first_logprobs = _token_logprobs(logits, firsts)[:, 0]  # (batch, choices)
        scores = [[float(first_logprobs[row, j]) for j in range(len(layout.continuations))]
                  for row, layout in enumerate(layouts)]

        longer = [(row, j) for row, layout in enumerate(layouts)
                  for j, continuation in enumerate(layout.continuations) if len(continuation) > 1]
        for start in range(0, len(longer), self.batch_size):
            chunk = longer[start:start + self.batch_size]
            rest_scores = self._score_rests([layouts[row] for row, _ in chunk], [j for _, j in chunk], cache,
                                            np.array([row for row, _ in chunk]), key_mask, sep_columns)
            for (row, j), value in zip(chunk, rest_scores):
                scores[row][j] += value
        return scores

    def _score_rests(self, layouts: List[_Layout], choices: List[int], cache: KVCache, rows: np.ndarray,
                     key_mask: np.ndarray, sep_columns: np.ndarray) -> List[float]:
        """Tokens 2.. of continuations over their item's cache (`rows` of it): right-padded, all positions kept."""
        pieces = [(layout.continuations[j][:-1], layout.continuation_positions[j][:, :-1])
                  for layout, j in zip(layouts, choices)]
        width = max(len(ids) for ids, _ in pieces)
        ids = np.full([len(pieces), width], self.template.pad_id, dtype="int64")
        positions = np.zeros([len(pieces), pieces[0][1].shape[0], width], dtype="int64")
        new_mask = np.zeros([len(pieces), width], dtype="float32")
        wanted = np.zeros([len(pieces), width, 1], dtype="int64")
        for row, ((piece, piece_positions), layout, j) in enumerate(zip(pieces, layouts, choices)):
            ids[row, :len(piece)], positions[row, :, :len(piece)] = piece, piece_positions
            new_mask[row, :len(piece)] = 1.0
            wanted[row, :len(piece), 0] = layout.continuations[j][1:]
        index = paddle.to_tensor(rows, dtype="int64")
        cache = [(k.index_select(index, 0), v.index_select(index, 0)) for k, v in cache]
        logits, _ = self._run(ids, positions, np.concatenate([key_mask[rows], new_mask], axis=1), sep_columns[rows],
                              cache, 0)
        logprobs = _token_logprobs(logits, wanted)[..., 0] * new_mask
        return [float(value) for value in logprobs.sum(axis=1)]

    # ---------------------------------------------------------------- the model

    def _run(self, ids: np.ndarray, positions: np.ndarray, key_mask: np.ndarray, sep_columns: np.ndarray,
             cache: Optional[KVCache], keep: int) -> Tuple[paddle.Tensor, KVCache]:
        """Logits of the last `keep` positions (0: all) [B, keep, V] and the cache after `ids` [B, q]."""
        output = self.model(
            paddle.to_tensor(ids, dtype="int64"),
            paddle.to_tensor(model_positions(positions), dtype="int64"),
            paddle.to_tensor(_attention_mask(key_mask, sep_columns, ids.shape[1])),
            cache=cache, num_logits_to_keep=keep,
        )
        return output.logits, output.past_key_values


def _shared_prefix(layouts: List[_Layout]) -> int:
    """Tokens at the start of every item (same ids, same positions) whose K/V see only each other: none unless every
    item has the same bidirectional prefix, and it lies inside (0 for causal families). Each item keeps at least one
    token of its own, whose logits predict its continuations."""
    sep = layouts[0].sep
    if any(layout.sep != sep for layout in layouts):
        return 0
    first = layouts[0]
    length = min(len(layout.opened) for layout in layouts) - 1
    for layout in layouts[1:]:
        same = (layout.opened[:length] == first.opened[:length]) & np.all(
            layout.opened_positions[:, :length] == first.opened_positions[:, :length], axis=0)
        length = int(np.argmin(same)) if not same.all() else length
    return length if sep <= length else 0


def _left_padded(sequences: List[Tuple[np.ndarray, np.ndarray, int]], pad_id: int, offset: int = 0):
    """(ids [B, q], positions [B, P, q], key mask [B, q], sep columns [B]) of (ids, positions, sep) rows padded on
    the left; sep counts tokens from the start of the sequence, `offset` of them already in the cache (and so are
    the columns returned)."""
    width = max(len(ids) for ids, _, _ in sequences)
    ids = np.full([len(sequences), width], pad_id, dtype="int64")
    positions = np.zeros([len(sequences), sequences[0][1].shape[0], width], dtype="int64")
    key_mask = np.zeros([len(sequences), width], dtype="float32")
    sep_columns = np.zeros([len(sequences)], dtype="int64")
    for row, (row_ids, row_positions, sep) in enumerate(sequences):
        pads = width - len(row_ids)
        ids[row, pads:], positions[row, :, pads:], key_mask[row, pads:] = row_ids, row_positions, 1.0
        sep_columns[row] = sep if sep <= offset else sep + pads  # past the cache, columns lag tokens by the pads
    return ids, positions, key_mask, sep_columns


def _attention_mask(key_mask: np.ndarray, sep_columns: np.ndarray, queries: int) -> np.ndarray:
    """Dense 0/1 mask [B, 1, q, T] of the last `queries` columns of rows whose real keys are `key_mask` [B, T]: a key
    is visible when real and in the bidirectional prefix (column < sep) or not after the query. Every query sees
    itself, so pad rows keep a finite softmax."""
    total = key_mask.shape[1]
    columns = np.arange(total)
    query_columns = columns[total - queries:]
    keys = columns[None, None, :]
    visible = (keys < sep_columns[:, None, None]) | (keys <= query_columns[None, :, None])
    mask = (visible & (key_mask[:, None, :] > 0)).astype("float32")  # (B, q, T)
    mask[:, np.arange(queries), query_columns] = 1.0
    return mask[:, None]


def _token_logprobs(logits: paddle.Tensor, targets: np.ndarray) -> np.ndarray:
    """log p(targets) [B, k, K] from logits [B, k, V], normalized in float64 (a float32 sum of a few tokens' log
    probabilities over a 65k vocabulary is off by ~1e-5), by logsumexp (Paddle's CPU log_softmax is far slower)."""
    logits = logits.astype("float64")
    normalizer = paddle.logsumexp(logits, axis=-1, keepdim=True)
    picked = paddle.take_along_axis(logits, paddle.to_tensor(targets), axis=-1)
    return (picked - normalizer).numpy()
