"""What every model family shares, written once: masks, attention with a K/V cache, the tensor-parallel
linear factory, the language-model head and loss, and strict checkpoint loading.

Conventions every family follows, so that decoding, the trainer, the exporter and the runners never ask
which family they drive:
- the cache is a list with one `(key, value)` pair per layer, each `[batch, tokens, kv_heads, head_dim]`
  (`kv_heads` = the attention heads, or the K/V groups of multi-query attention), or, in exported graphs, one
  `SegmentedCache` per layer (fixed capacity, written in place); attention goes through `attend_cached`, which
  serves both;
- attention masks are 0/1 (1 = may attend): a 1-D `[B]` "sep" mask (keys `j < sep` are visible to every
  query, the rest is causal: GLM's part A, ChatGLM's prompt prefix; 0 = plain causal) or a dense
  `[B, 1, q, cache + q]` mask used as given;
- `forward(input_ids, position_ids, attention_mask, labels, loss_mask, cache, label_smoothing,
  num_logits_to_keep, loss_positions_only, return_dict, use_cache, logit_index)` returns logits, loss and the new
  cache; the output projection reads `projected(hidden_states, num_logits_to_keep, logit_index)`.
"""
from __future__ import annotations

import contextlib
import math
import os
import pickle
import re
from typing import List, NamedTuple, Optional, Tuple

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle import Tensor

from ..linear import Linear
from ..parallel import (
    ColumnParallelLinear, RowParallelLinear, copy_to_model_parallel, gather_from_model_parallel,
    parallel_cross_entropy, tensor_parallel_degree,
)

__all__ = [
    "KVCache", "SegmentedCache", "MASKED", "attend_cached", "rows_first_projection", "default_position_ids", "sep_to_dense_mask", "mask_bias", "parallel_linear", "attend", "lm_head", "lm_loss",
    "projected",
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
        return Linear(in_features, out_features, bias_attr=None if bias else False)
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


class SegmentedCache(NamedTuple):
    """One layer's cache in an exported graph (`export/exporter.py`): fixed capacity, written in place.

    - `key`, `value` [N, kv_heads, capacity, head_dim]: each decoding row's own slots; a call writes its q new
      tokens at [start, start + q) (in place: Paddle Inference's `set_value_with_tensor_` on the fed tensor, ONNX
      Runtime's ScatterElements into the output bound to the same buffer);
    - `shared_key`, `shared_value` [N / k, kv_heads, K, head_dim]: read only, one row for k consecutive rows (a
      prompt and its prefix, which the k beams or samples that continue it read once instead of k times);
    - `start` [1] int64.
    Heads-first, so attention reads the cache with no transposed copy. The mask covers [K shared | capacity]
    columns; slots not yet written are masked.
    """

    key: Tensor
    value: Tensor
    shared_key: Tensor
    shared_value: Tensor
    start: Tensor


def attend_cached(query: Tensor, key: Tensor, value: Tensor, cache, bias: Tensor, dropout: Optional[nn.Layer],
                  use_flash_attention: bool = False, coeff: float = 1.0, fill: Optional[float] = None):
    """Attention of the new tokens' query/key/value [B, q, heads or kv_heads, head_dim] over a layer's cache
    (None, a `(key, value)` pair, or a `SegmentedCache`); returns (context [B, q, heads, head_dim], the new cache)."""
    if isinstance(cache, SegmentedCache):
        return _attend_segments(query, key, value, cache, bias, dropout, coeff, fill)
    if cache is not None:
        key = paddle.concat([cache[0], key], axis=1)  # (B, cache + q, kv, hd)
        value = paddle.concat([cache[1], value], axis=1)
    return attend(query, key, value, bias, dropout, use_flash_attention, coeff, fill), (key, value)


def _attend_segments(query: Tensor, key: Tensor, value: Tensor, cache: SegmentedCache, bias: Tensor,
                     dropout: Optional[nn.Layer], coeff: float, fill: Optional[float]):
    """`attend` over [shared | own slots] after writing the new keys and values into the slots.

    Rows n = b k + j (k rows per shared row b). Query head h reads K/V group h // r (r = heads / kv_heads): the
    queries of a group's r heads (and, for the shared part, of the k rows) are stacked into one matrix, so every
    cached key and value is read once per step."""
    rows, length, heads, head_dim = query.shape
    groups = cache.key.shape[1]
    slots_k, slots_v = cache.key, cache.value
    slots_k[:, :, cache.start:cache.start + length] = key.transpose([0, 2, 1, 3])  # (N, kv, capacity, hd)
    slots_v[:, :, cache.start:cache.start + length] = value.transpose([0, 2, 1, 3])
    shared_rows, shared_length, capacity = cache.shared_key.shape[0], cache.shared_key.shape[2], slots_k.shape[2]
    query = query.transpose([0, 2, 1, 3]) * (1.0 / (math.sqrt(head_dim) * coeff))  # (N, nh, q, hd)
    # shared part: (B, k, kv, r, q, hd) -> (B, kv, k r q, hd)
    stacked = query.reshape([shared_rows, -1, groups, heads // groups, length, head_dim]).transpose([0, 2, 1, 3, 4, 5])
    shared = paddle.matmul(stacked.reshape([shared_rows, groups, -1, head_dim]), cache.shared_key, transpose_y=True)
    shared = shared.reshape([shared_rows, groups, -1, heads // groups, length, shared_length])  # (B, kv, k, r, q, K)
    shared = shared.transpose([0, 2, 1, 3, 4, 5]).reshape([rows, heads, length, shared_length])
    own = paddle.matmul(query.reshape([rows, groups, -1, head_dim]), slots_k, transpose_y=True)  # (N, kv, r q, C)
    scores = paddle.concat([shared, own.reshape([rows, heads, length, capacity])], axis=-1)  # (N, nh, q, K + C)
    if scores.dtype != paddle.float64:
        scores = scores.astype("float32")
    scores = scores + bias if fill is None else paddle.where(bias >= 0, scores, paddle.full([], fill, scores.dtype))
    if coeff != 1.0:
        scores = scores * coeff
    probs = F.softmax(scores, axis=-1).astype(value.dtype)
    if dropout is not None:
        probs = dropout(probs)
    shared_probs, own_probs = paddle.split(probs, [shared_length, capacity], axis=-1)
    shared_probs = shared_probs.reshape([shared_rows, -1, groups, heads // groups, length, shared_length])
    shared_probs = shared_probs.transpose([0, 2, 1, 3, 4, 5]).reshape([shared_rows, groups, -1, shared_length])
    context = paddle.matmul(shared_probs, cache.shared_value)  # (B, kv, k r q, hd)
    context = context.reshape([shared_rows, groups, -1, heads // groups, length, head_dim])
    context = context.transpose([0, 2, 1, 3, 4, 5]).reshape([rows, heads, length, head_dim])
    context = context + paddle.matmul(own_probs.reshape([rows, groups, -1, capacity]), slots_v).reshape(
        [rows, heads, length, head_dim])
    return context.transpose([0, 2, 1, 3]), cache._replace(key=slots_k, value=slots_v)


def _repeat_groups(tensor: Tensor, repeats: int) -> Tensor:
    """[B, k, groups, hd] -> [B, k, groups * repeats, hd], group g at heads g * repeats ... (g + 1) * repeats - 1."""
    return tensor.unsqueeze(3).expand([-1, -1, -1, repeats, -1]).flatten(2, 3)


def default_position_ids(batch: int, length: int, start: int) -> Tensor:
    """2-D positions [B, 2, S] of a text without blanks: start..start+S-1 and block positions 0 (GLM, ChatGLM-6B)."""
    positions = paddle.arange(start, start + length, dtype="int64")
    return paddle.stack([positions, paddle.zeros_like(positions)]).unsqueeze(0).expand([batch, 2, length])


def projected(hidden_states: Tensor, num_logits_to_keep: int = 0, logit_index: Optional[Tensor] = None) -> Tensor:
    """The hidden states [B, S, H] the output projection reads: the last `num_logits_to_keep` positions (0: all),
    or the positions `logit_index` [M] (int64, flat over the B * S tokens) as [M, 1, H]. An exported step graph
    takes `logit_index` as an input: a server passes the prompts of requests arriving together packed into one
    row, and projects each prompt's last position only (the projection is most of a short prompt's pass:
    glm-large's 50048 x 1024, ~8 of a 16 ms pass on 2 cores)."""
    if logit_index is not None:
        return paddle.gather(hidden_states.reshape([-1, hidden_states.shape[-1]]), logit_index).unsqueeze(1)
    if num_logits_to_keep:
        hidden_states = hidden_states[:, -num_logits_to_keep:]
    return hidden_states


ROWS_FIRST = (4, 256)  # rows of a dynamic-graph projection without labels computed rows first (`lm_head`)


def lm_head(model, hidden_states: Tensor, weight: Tensor, labels: Optional[Tensor], loss_mask: Optional[Tensor],
            label_smoothing: float, transpose_y: bool = True, vocab_start: int = 0, rows_first: bool = False):
    """(logits, loss) of the output projection `weight` ([V, H] with `transpose_y`, else [H, V]).

    Under tensor parallelism the projection is vocabulary-sharded: the loss never gathers the logits (they are
    returned sharded with a loss); without labels (generation) they are gathered whole.
    `rows_first` (the Paddle graph of an export, a few rows per step): a [V, H] weight multiplies as (W h^T)^T.
    Paddle's CPU matmul is several times slower with a large transposed second operand once h has a few rows
    (glm-large's 50048 x 1024 at 8 rows: ~50 against ~17 ms); the [V, rows] product is small to transpose back.
    Dynamic-graph decoding takes that form by itself for ROWS_FIRST rows without labels (measured, one thread:
    1-3 rows 18 ms either way or worse rows first; 5 rows 37 -> 34 ms, 8 rows 65 -> 39, 32 rows 67 -> 47). Not
    for training or scoring, where that product is as large as the logits.
    """
    if tensor_parallel_degree(model.config) == 1:
        rows = hidden_states.shape[0] * hidden_states.shape[1]
        decoding = labels is None and paddle.in_dynamic_mode() and ROWS_FIRST[0] <= rows <= ROWS_FIRST[1]
        if transpose_y and (rows_first or decoding):
            flat = hidden_states.reshape([-1, hidden_states.shape[-1]])  # (B q, H)
            logits = paddle.matmul(weight, flat, transpose_y=True).transpose([1, 0])  # (B q, V)
            logits = logits.reshape([hidden_states.shape[0], hidden_states.shape[1], -1])  # (B, q, V)
        else:
            logits = paddle.matmul(hidden_states, weight, transpose_y=transpose_y)
        return logits, None if labels is None else lm_loss(logits, labels, loss_mask, label_smoothing)
    logits = paddle.matmul(copy_to_model_parallel(hidden_states), weight, transpose_y=transpose_y)
    if labels is None:
        return gather_from_model_parallel(logits), None
    token_loss = parallel_cross_entropy(logits, labels, vocab_start, model.config.vocab_size, label_smoothing)
    return logits, masked_mean(token_loss, loss_mask)


@contextlib.contextmanager
def rows_first_projection(model):
    """`model.projection_rows_first` on for the block (`lm_head`; a family's `paddle_graph_form`)."""
    model.projection_rows_first = True
    try:
        yield
    finally:
        model.projection_rows_first = False


def lm_loss(logits: Tensor, labels: Tensor, loss_mask: Optional[Tensor], label_smoothing: float = 0.0) -> Tensor:
    """Masked mean of token cross-entropy, with label smoothing over the whole vocabulary.

    Per token: (1 - eps) * (-log p[label]) + eps * mean_v(-log p[v]) — the same objective as PaddleNLP's GLM
    and `F.cross_entropy(label_smoothing=eps)`, computed in float32 as ce + eps * (x[label] - mean(x)) with
    ce = logsumexp(x) - x[label] from `F.cross_entropy`'s fused kernel. On CPU that kernel takes ~0.5 s forward and
    backward over 2000 x 50k logits where `logsumexp` + `take_along_axis` took ~2.9 s (`log_softmax` is slower
    still); with smoothing the label's logit is gathered from the flattened rows (`take_along_axis`'s gradient
    alone took ~1 s).
    """
    vocab = logits.shape[-1]
    flat = logits.astype("float32").reshape([-1, vocab])
    targets = labels.astype("int64").reshape([-1])
    token_loss = F.cross_entropy(flat, targets, reduction="none").reshape([-1])
    if label_smoothing > 0:
        rows = paddle.arange(flat.shape[0], dtype="int64")
        target = paddle.gather(flat.reshape([-1]), rows * vocab + targets)
        token_loss = token_loss + label_smoothing * (target - flat.mean(axis=-1))
    return masked_mean(token_loss.reshape(labels.shape), loss_mask)


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
