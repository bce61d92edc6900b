"""What every model family shares, written once: masks, attention with a K/V cache, the tensor-parallel
linear factory, the language-model head and loss, and strict checkpoint loading.

Conventions every family follows, so that decoding, the trainer, the exporter and the runners never ask
which family they drive:
- the cache is a list with one `(key, value)` pair per layer, each `[batch, tokens, kv_heads, head_dim]`
  (`kv_heads` = the attention heads, or the K/V groups of multi-query attention);
- attention masks are 0/1 (1 = may attend): a 1-D `[B]` "sep" mask (keys `j < sep` are visible to every
  query, the rest is causal: GLM's part A, ChatGLM's prompt prefix; 0 = plain causal) or a dense
  `[B, 1, q, cache + q]` mask used as given;
- `forward(input_ids, position_ids, attention_mask, labels, loss_mask, cache, label_smoothing,
  num_logits_to_keep, loss_positions_only, return_dict, use_cache)` returns logits, loss and the new cache.
"""
from __future__ import annotations

import math
import os
import pickle
import re
from typing import List, Optional, Tuple

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle import Tensor

from ..parallel import (
    ColumnParallelLinear, RowParallelLinear, copy_to_model_parallel, gather_from_model_parallel,
    parallel_cross_entropy, tensor_parallel_degree,
)

__all__ = [
    "KVCache", "MASKED", "default_position_ids", "sep_to_dense_mask", "mask_bias", "parallel_linear", "attend", "lm_head", "lm_loss",
    "masked_mean", "loss_positions", "StrictLoading",
]

# One (key, value) pair per layer, each [batch, cache_len, kv_heads, head_dim].
KVCache = List[Tuple[Tensor, Tensor]]

# Additive bias for masked scores: the most negative fp16 number, so that fp32, fp16 and bf16 runs mask alike
# and a fully masked (padding) row keeps a finite softmax.
MASKED = -65504.0


def sep_to_dense_mask(sep: Tensor, query_length: int, cache_length: int = 0) -> Tensor:
    """Expand per-sample prefix lengths `sep` [B] into a dense 0/1 mask [B, 1, q, cache + q]."""
    total = cache_length + query_length
    rows = paddle.arange(cache_length, total, dtype="int64").reshape([1, -1, 1])
    cols = paddle.arange(0, total, dtype="int64").reshape([1, 1, -1])
    visible = (cols <= rows) | (cols < sep.astype("int64").reshape([-1, 1, 1]))
    return visible.astype("float32").unsqueeze(1)


def mask_bias(attention_mask: Tensor, query_length: int, cache_length: int) -> Tensor:
    """The additive float32 bias [B, 1, q, cache + q] of a sep or dense 0/1 mask."""
    if attention_mask.ndim == 1:
        attention_mask = sep_to_dense_mask(attention_mask, query_length, cache_length)
    return (1.0 - attention_mask.astype("float32")) * MASKED


def parallel_linear(config, in_features: int, out_features: int, split: str, bias: bool = True) -> nn.Layer:
    """nn.Linear, or its column/row-parallel form (`split`) when the config asks for tensor parallelism."""
    if tensor_parallel_degree(config) == 1:
        return nn.Linear(in_features, out_features, bias_attr=None if bias else False)
    layer = ColumnParallelLinear if split == "column" else RowParallelLinear
    return layer(in_features, out_features, bias=bias)


def attend(query: Tensor, key: Tensor, value: Tensor, bias: Tensor, dropout: Optional[nn.Layer],
           use_flash_attention: bool = False, coeff: float = 1.0, fill: Optional[float] = None) -> Tensor:
    """softmax(q k^T / sqrt(head_dim) + bias) v over [B, len, heads, head_dim] tensors -> [B, q, heads, head_dim].

    `key`/`value` may hold fewer heads than `query` (multi-query attention): query head h reads K/V group
    h // (heads / groups). The queries are scaled, not the (q, k) scores: in a decode step q = 1 while k is
    the whole cache. `dropout` may be None (families without attention dropout).

    THUDM's ChatGLM-6B attention, which its weights were trained with, takes two options:
    - `coeff` (query-key layer scaling): the queries are scaled by 1 / (sqrt(head_dim) * coeff) and the float32
      scores multiplied back by `coeff`, which keeps half-precision scores in range;
    - `fill`: masked scores (where `bias` is negative) are *replaced* by `fill` before that multiplication rather
      than biased, so a fully masked (padding) row attends uniformly instead of by its raw scores.
    The fused path ignores both: `coeff` cancels mathematically, and with the additive bias only fully masked
    rows, which no other position reads, come out differently.
    """
    heads, groups = query.shape[2], key.shape[2]
    if groups != heads:  # each group repeated for its heads; not `repeat_interleave`, which paddle2onnx gets wrong
        key, value = (_repeat_groups(tensor, heads // groups) for tensor in (key, value))
    if use_flash_attention:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=bias.astype(query.dtype),
                                              dropout_p=dropout.p if dropout is not None else 0.0,
                                              training=dropout is not None and dropout.training)
    query = query.transpose([0, 2, 1, 3]) * (1.0 / (math.sqrt(query.shape[-1]) * coeff))  # (B, nh, q, hd)
    key = key.transpose([0, 2, 1, 3])  # (B, nh, k, hd)
    value = value.transpose([0, 2, 1, 3])  # (B, nh, k, hd)
    scores = paddle.matmul(query, key, transpose_y=True)  # (B, nh, q, k)
    if scores.dtype != paddle.float64:  # softmax in float32 at least
        scores = scores.astype("float32")
    # In place: every (q, k)-sized pass that allocates costs as much as the pass itself on CPU.
    if fill is None:
        scores = scores.add_(bias)
    else:  # `where_`, not `masked_fill_`: paddle2onnx 2.1 has no masked_fill
        scores = paddle.where_(bias >= 0, scores, paddle.full([], fill, scores.dtype))
    if coeff != 1.0:
        scores = scores.scale_(coeff)
    probs = F.softmax_(scores, axis=-1).astype(value.dtype)
    if dropout is not None:
        probs = dropout(probs)
    return paddle.matmul(probs, value).transpose([0, 2, 1, 3])


def _repeat_groups(tensor: Tensor, repeats: int) -> Tensor:
    """[B, k, groups, hd] -> [B, k, groups * repeats, hd], group g at heads g * repeats ... (g + 1) * repeats - 1."""
    return tensor.unsqueeze(3).expand([-1, -1, -1, repeats, -1]).flatten(2, 3)


def default_position_ids(batch: int, length: int, start: int) -> Tensor:
    """2-D positions [B, 2, S] of a text without blanks: start..start+S-1 and block positions 0 (GLM, ChatGLM-6B)."""
    positions = paddle.arange(start, start + length, dtype="int64")
    return paddle.stack([positions, paddle.zeros_like(positions)]).unsqueeze(0).expand([batch, 2, length])


def lm_head(model, hidden_states: Tensor, weight: Tensor, labels: Optional[Tensor], loss_mask: Optional[Tensor],
            label_smoothing: float, transpose_y: bool = True, vocab_start: int = 0):
    """(logits, loss) of the output projection `weight` ([V, H] with `transpose_y`, else [H, V]).

    Under tensor parallelism the projection is vocabulary-sharded: the loss never gathers the logits (they are
    returned sharded with a loss); without labels (generation) they are gathered whole.
    """
    if tensor_parallel_degree(model.config) == 1:
        logits = paddle.matmul(hidden_states, weight, transpose_y=transpose_y)
        return logits, None if labels is None else lm_loss(logits, labels, loss_mask, label_smoothing)
    logits = paddle.matmul(copy_to_model_parallel(hidden_states), weight, transpose_y=transpose_y)
    if labels is None:
        return gather_from_model_parallel(logits), None
    token_loss = parallel_cross_entropy(logits, labels, vocab_start, model.config.vocab_size, label_smoothing)
    return logits, masked_mean(token_loss, loss_mask)


def lm_loss(logits: Tensor, labels: Tensor, loss_mask: Optional[Tensor], label_smoothing: float = 0.0) -> Tensor:
    """Masked mean of token cross-entropy, with label smoothing over the whole vocabulary.

    Per token: (1 - eps) * (-log p[label]) + eps * mean_v(-log p[v]) — the same objective as PaddleNLP's GLM
    and `F.cross_entropy(label_smoothing=eps)`, computed in float32 as logsumexp(x) - (1 - eps) * x[label] -
    eps * mean(x). (Paddle's CPU `log_softmax` kernel is ~25x slower than `logsumexp`.)
    """
    logits = logits.astype("float32")
    log_normalizer = paddle.logsumexp(logits, axis=-1)
    target = paddle.take_along_axis(logits, labels.astype("int64").unsqueeze(-1), axis=-1).squeeze(-1)
    token_loss = log_normalizer - target
    if label_smoothing > 0:
        token_loss = log_normalizer - (1.0 - label_smoothing) * target - label_smoothing * logits.mean(axis=-1)
    return masked_mean(token_loss, loss_mask)


def masked_mean(token_loss: Tensor, loss_mask: Optional[Tensor]) -> Tensor:
    if loss_mask is None:
        return token_loss.mean()
    loss_mask = loss_mask.astype("float32").reshape(token_loss.shape)
    return (token_loss * loss_mask).sum() / loss_mask.sum().clip(min=1.0)


def loss_positions(hidden_states: Tensor, labels: Tensor, loss_mask: Tensor):
    """The rows of the flattened batch whose loss mask is set (hidden [N, H], labels [N], mask [N]): training
    projects to the vocabulary only there, typically a fifth of the positions."""
    mask = loss_mask.reshape([-1]).astype("float32")
    index = paddle.nonzero(mask > 0).squeeze(-1)
    hidden_states = paddle.index_select(hidden_states.reshape([-1, hidden_states.shape[-1]]), index)
    return hidden_states, paddle.index_select(labels.reshape([-1]), index), paddle.index_select(mask, index)


_TP_SHARD = re.compile(r"^model(_state)?\.tp\d\d\.(pdparams|safetensors)$")  # PaddleNLP's shard names


def _check_weight_files(directory: str, degree: int) -> None:
    """A clear error before PaddleNLP's: which weight files a directory lacks, and what to do."""
    names = os.listdir(directory)
    shards = sorted(n for n in names if _TP_SHARD.match(n))
    whole = [n for n in names if n in ("model_state.pdparams", "model.safetensors", "model_state.safetensors")
             or n.endswith(".index.json")]
    if degree <= 1 and not whole:
        hint = (f"it holds {len(shards)} tensor-parallel shards: load them with --tensor_parallel_degree {len(shards)} "
                f"or merge them first (python -m paddle_glm.checkpoint merge)") if shards else "it holds no weights"
        raise FileNotFoundError(f"{directory}: no model_state.pdparams or model.safetensors; {hint}")
    if degree > 1 and not whole and len(shards) != degree:
        raise ValueError(f"{directory}: {len(shards)} tensor-parallel shards but --tensor_parallel_degree {degree}; "
                         "use the same degree or merge/split them (python -m paddle_glm.checkpoint)")


class StrictLoading:
    """Mixed into a family's `PretrainedModel`: PaddleNLP's loader, made strict.

    PaddleNLP only warns when tensors are missing and leaves them randomly initialised; here a missing,
    unreadable, partial or mismatched checkpoint is an error naming the directory and the fix.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        path = str(pretrained_model_name_or_path)
        if os.path.isdir(path):
            _check_weight_files(path, int(kwargs.get("tensor_parallel_degree", 1) or 1))
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except (EOFError, pickle.UnpicklingError, OSError) as error:
            if not os.path.isdir(path):
                raise
            raise ValueError(f"{path}: the weights cannot be read (truncated or corrupted file?): {error}") from None
        except RuntimeError as error:  # PaddleNLP's shape mismatches: name the checkpoint too
            if "loading state_dict" not in str(error):
                raise
            raise ValueError(f"{path}: {error}") from None

    @classmethod
    def _load_pretrained_model(cls, model, *args, **kwargs):
        loaded = super()._load_pretrained_model(model, *args, **kwargs)
        _, missing, unexpected, mismatched = loaded
        problems = [f"{len(missing)} tensors missing (e.g. {sorted(missing)[:3]})"] if missing else []
        problems += [f"{len(unexpected)} unexpected tensors (e.g. {sorted(unexpected)[:3]})"] if unexpected else []
        problems += [f"{key}: checkpoint {a} vs model {b}" for key, a, b in mismatched[:3]]
        if problems:
            source = kwargs.get("pretrained_model_name_or_path", args[3] if len(args) > 3 else "the checkpoint")
            raise ValueError(f"{source} does not fit {cls.__name__} with this config: " + "; ".join(problems))
        return loaded
