"""ChatGLM2-6B and ChatGLM3-6B (one architecture) for causal LM, with a real K/V cache over multi-query attention.

Read top-down: norm -> rotary embeddings -> attention -> MLP -> block -> stack -> model -> LM head, then the family
(tokenizer loading, ChatGLM2's and ChatGLM3's chat templates, the registry entry). State-dict
keys, shapes and layouts are those of `paddlenlp.transformers.ChatGLMv2ForCausalLM` (linear weights stored
[in, out], QKV fused as [Q | K | V] blocks, `chatglm_v2.rotary_pos_emb.inv_freq` kept, an untied
`chatglm_v2.output_layer`), and `config.json` is its `ChatGLMv2Config`, so checkpoints move between the two
unchanged. The computation is THUDM's `modeling_chatglm.py` (ChatGLM2-6B / ChatGLM3-6B), which the released
weights were trained with: RMSNorm, SwiGLU, multi-query attention (query head h reads K/V group
h // (heads / groups)), QKV bias, rotary embeddings on interleaved pairs of the first half of each head's
dims, 1-D positions [B, S].

Where PaddleNLP's port and THUDM's code disagree, THUDM's is followed (each marked "THUDM:" below):
- rotary cos/sin are taken in float32 and then cast to the activation dtype (PaddleNLP casts the angles to
  the default dtype first: coarser cos/sin in fp16/bf16);
- a given cache is attended to even with `use_cache=False` (PaddleNLP drops it);
- `kv_channels * num_attention_heads` may differ from `hidden_size` (PaddleNLP asserts they are equal);
- `rope_ratio` (ChatGLM3-6B-32k's config) scales the rotary base (PaddleNLP ignores it).
What differs from both: the cache is [B, T, groups, head_dim] (THUDM's is sequence-first), a 1-D "sep" or
dense 0/1 attention mask is taken as the other families take it (THUDM's 2-D padding mask is the pipeline's
business: a dense mask hiding the pads does the same), the rotary angles are computed for the positions
given rather than looked up in a `seq_length` table (same values, no length limit), and labels are aligned
with the logits (the caller shifts, as for every family and PaddleNLP; THUDM's own loss shifts inside).
"""
from __future__ import annotations

import json
import os
import re
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import paddle
import paddle.distributed as dist
import paddle.nn as nn
import paddle.nn.functional as F
from paddle import Tensor
from paddle.distributed.fleet.utils import recompute
from paddlenlp.transformers import PretrainedModel, register_base_model
from paddlenlp.transformers.chatglm_v2.configuration import CHATGLM_V2_PRETRAINED_RESOURCE_FILES_MAP, ChatGLMv2Config
from paddlenlp.transformers.chatglm_v2.modeling import ChatGLMv2PretrainedModel as _PaddleNLPChatGLMv2PretrainedModel
from paddlenlp.transformers.chatglm_v2.tokenizer import ChatGLMv2Tokenizer as _PaddleNLPChatGLMv2Tokenizer
from paddlenlp.transformers.conversion_utils import split_or_merge_func
from paddlenlp.transformers.model_outputs import CausalLMOutputWithCrossAttentions

from ..dropout import Dropout
from ..parallel import (
    ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, model_parallel_group, tensor_parallel_degree,
)
from .family import Family, History, Template
from .layers import (
    KVCache, StrictLoading, attend_cached, lm_head, loss_positions, mask_bias, parallel_linear, projected,
)
from .release import THUDM_CHATGLM_MODEL_CODE, THUDM_CHATGLM_TOKENIZER, Release

__all__ = [
    "ChatGLMv2Config", "ChatGLMv2PretrainedModel", "ChatGLMv2Model", "ChatGLMv2ForCausalLM", "kv_groups_per_rank",
    "ChatGLMv2Tokenizer", "load_chatglm2_tokenizer", "ChatGLM2Template", "ChatGLM3Template", "ChatGLM2Family", "FAMILY",
]

IGNORE_INDEX = -100  # PaddleNLP's and THUDM's label for "no loss here", honoured when no loss_mask is given
LayerCache = Tuple[Tensor, Tensor]  # one layer's (key, value), each [B, T, groups, head_dim]


def head_dim(config: ChatGLMv2Config) -> int:
    return config.kv_channels or config.hidden_size // config.num_attention_heads


def kv_groups_per_rank(config: ChatGLMv2Config) -> Tuple[int, int]:
    """(K/V groups each tensor-parallel rank holds, ranks holding each group), for N ranks, H heads, G groups.

    Rank r holds query heads [r H/N, (r + 1) H/N) and the groups they read. With N <= G the groups split like
    the heads, G/N per rank; with N > G a rank's heads all read group r // (N/G), which N/G ranks hold alike.
    """
    degree, heads, groups = tensor_parallel_degree(config), config.num_attention_heads, config.multi_query_group_num
    if heads % degree:
        raise ValueError(f"--tensor_parallel_degree {degree} does not divide the {heads} attention heads")
    if groups % degree == 0:
        return groups // degree, 1
    if degree % groups == 0:
        return 1, degree // groups
    raise ValueError(f"--tensor_parallel_degree {degree} and the {groups} K/V groups (multi_query_group_num) "
                     "must divide one another: a rank's query heads must read whole groups")


def _check_config(config: ChatGLMv2Config) -> None:
    problems = []
    if config.num_attention_heads % config.multi_query_group_num:
        problems.append(f"multi_query_group_num {config.multi_query_group_num} does not divide "
                        f"num_attention_heads {config.num_attention_heads}")
    if getattr(config, "multi_query_attention", True) is False:
        problems.append("multi_query_attention false (per-head interleaved QKV) is not supported; every ChatGLM2/3 "
                        "release uses multi-query attention")
    if config.use_long_sequence_strategies:
        problems.append("use_long_sequence_strategies is not supported (use rope_ratio for ChatGLM3's long models)")
    if config.fp32_residual_connection:
        problems.append("fp32_residual_connection is not supported (no ChatGLM2/3 release sets it)")
    if problems:
        raise ValueError("ChatGLMv2Config: " + "; ".join(problems))


class RMSNorm(nn.Layer):
    """x / rms(x) * weight, in float32 whatever the activation dtype, as THUDM's."""

    def __init__(self, hidden_size: int, epsilon: float):
        super().__init__()
        self.weight = self.create_parameter([hidden_size], default_initializer=nn.initializer.Constant(1.0))
        self.epsilon = epsilon

    def forward(self, hidden_states: Tensor) -> Tensor:
        hidden = hidden_states.astype("float32")
        hidden = hidden * paddle.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.epsilon)
        return (self.weight.astype("float32") * hidden).astype(hidden_states.dtype)


def _norm(config: ChatGLMv2Config) -> nn.Layer:
    if config.rmsnorm:
        return RMSNorm(config.hidden_size, config.layernorm_epsilon)
    return nn.LayerNorm(config.hidden_size, epsilon=config.layernorm_epsilon)


class RotaryEmbedding(nn.Layer):
    """cos and sin of THUDM's rotary angles at the given positions.

    The pair (x[2i], x[2i + 1]) of the first `head_dim / 2` dims of every query and key head turns by
    position * theta_i, theta_i = base ** (-2i / (head_dim / 2)), base = 10000 * rope_ratio. THUDM looks the
    positions up in a [seq_length, head_dim / 4, 2] table of [cos, sin]; its entries are these same float32
    products. `inv_freq` is here only because THUDM's and PaddleNLP's checkpoints hold it: like them, the
    angles come from the base, never from the stored (possibly half-precision) buffer.
    """

    def __init__(self, config: ChatGLMv2Config):
        super().__init__()
        self.dims = head_dim(config) // 2  # rotated dims per head
        # THUDM (ChatGLM3-6B-32k): `rope_ratio` scales the base; PaddleNLP has no such setting.
        self.base = 10000.0 * float(getattr(config, "rope_ratio", 1) or 1)
        self.register_buffer("inv_freq", 1.0 / (10000 ** (paddle.arange(0, self.dims, 2, dtype="float32") / self.dims)))

    def forward(self, position_ids: Tensor, dtype) -> Tuple[Tensor, Tensor]:
        theta = 1.0 / (self.base ** (paddle.arange(0, self.dims, 2, dtype="float32") / self.dims))  # (dims/2,)
        angles = position_ids.astype("float32").unsqueeze(-1) * theta  # (B, S, dims/2)
        # THUDM: cos/sin in float32, then cast (PaddleNLP casts the angles to the default dtype before cos/sin).
        cos, sin = paddle.cos(angles).astype(dtype), paddle.sin(angles).astype(dtype)
        return cos.unsqueeze(2), sin.unsqueeze(2)  # (B, S, 1, dims/2): broadcast over heads


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """THUDM's `apply_rotary_pos_emb` on [B, S, heads, head_dim]: interleaved pairs of the first 2 * cos.shape[-1]
    dims rotate, the rest pass through."""
    rotated = 2 * cos.shape[-1]
    pairs = x[..., :rotated].reshape([0, 0, 0, -1, 2])  # (B, S, n, dims/2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    turned = paddle.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1).flatten(3)  # (B, S, n, dims)
    return paddle.concat([turned, x[..., rotated:]], axis=-1)


def _sum_over_replicas(query_width: int, replicas: int) -> Callable[[Tensor], Tensor]:
    """Gradient hook for a QKV weight/bias whose K/V columns `replicas` ranks hold alike (degree > groups).

    Each copy's gradient covers only its own rank's query heads; the group's gradient is their sum. Every
    holder adds the same gathered tensors in the same order, so the copies stay bit-identical in training.
    """

    def hook(grad: Tensor) -> Tensor:
        group = model_parallel_group()
        gathered: List[Tensor] = []
        dist.all_gather(gathered, grad[..., query_width:].contiguous(), group=group)
        first = group.rank // replicas * replicas
        return paddle.concat([grad[..., :query_width], paddle.add_n(gathered[first:first + replicas])], axis=-1)

    return hook


class SelfAttention(nn.Layer):
    """Multi-query attention: fused [Q | K | V] projection with bias, rotary queries and keys, a cache of the groups."""

    def __init__(self, config: ChatGLMv2Config):
        super().__init__()
        degree = tensor_parallel_degree(config)
        self.num_groups, replicas = kv_groups_per_rank(config)  # this rank's K/V groups
        self.num_heads = config.num_attention_heads // degree  # this rank's query heads
        self.head_dim = head_dim(config)
        # A rank's shard is [Q_r | K_r | V_r], laid out as the whole matrix. With replicated groups the N shards
        # together are wider than the checkpoint's matrix (see `_get_tensor_parallel_mappings`).
        width = (self.num_heads + 2 * self.num_groups) * self.head_dim
        self.query_key_value = parallel_linear(config, config.hidden_size, degree * width, "column",
                                               bias=config.add_bias_linear or config.add_qkv_bias)
        # THUDM: the attention output is projected from heads * kv_channels, not from hidden_size.
        self.dense = parallel_linear(config, config.num_attention_heads * self.head_dim, config.hidden_size, "row",
                                     bias=config.add_bias_linear)
        self.attention_dropout = Dropout(config.attention_dropout)
        self.use_flash_attention = bool(config.use_flash_attention)
        # Replicated groups: the gradient of each K/V column (weight, bias; a LoRA adapter's B, see the family's
        # `prepare_lora`) sums over the ranks holding the group.
        self.replica_hook = _sum_over_replicas(self.num_heads * self.head_dim, replicas) if replicas > 1 else None
        if self.replica_hook is not None:
            for parameter in (self.query_key_value.weight, self.query_key_value.bias):
                if parameter is not None:
                    parameter.register_hook(self.replica_hook)

    def forward(
        self, hidden_states: Tensor, bias: Tensor, cos: Tensor, sin: Tensor, cache: Optional[LayerCache] = None
    ) -> Tuple[Tensor, LayerCache]:
        batch, length = hidden_states.shape[0], hidden_states.shape[1]
        query_width, kv_width = self.num_heads * self.head_dim, self.num_groups * self.head_dim
        mixed = self.query_key_value(hidden_states)  # (B, q, (nh + 2 ng) * hd)
        query, key, value = paddle.split(mixed, [query_width, kv_width, kv_width], axis=-1)
        query = apply_rotary(query.reshape([batch, length, self.num_heads, self.head_dim]), cos, sin)  # (B, q, nh, hd)
        key = apply_rotary(key.reshape([batch, length, self.num_groups, self.head_dim]), cos, sin)  # (B, q, ng, hd)
        value = value.reshape([batch, length, self.num_groups, self.head_dim])
        # A given cache is used whatever `use_cache` says (THUDM; PaddleNLP ignores it without use_cache).
        context, cache = attend_cached(query, key, value, cache, bias, self.attention_dropout,
                                       self.use_flash_attention)  # (B, q, nh, hd)
        return self.dense(context.reshape([batch, length, query_width])), cache


class MLP(nn.Layer):
    """SwiGLU: h -> [gate | up] (2 x ffn) -> silu(gate) * up -> h."""

    def __init__(self, config: ChatGLMv2Config):
        super().__init__()
        # Under tensor parallelism a rank holds matching slices of both halves, [gate_r | up_r].
        self.dense_h_to_4h = parallel_linear(config, config.hidden_size, 2 * config.ffn_hidden_size, "column",
                                             bias=config.add_bias_linear)
        self.dense_4h_to_h = parallel_linear(config, config.ffn_hidden_size, config.hidden_size, "row",
                                             bias=config.add_bias_linear)

    def forward(self, hidden_states: Tensor) -> Tensor:
        gate, up = paddle.chunk(self.dense_h_to_4h(hidden_states), 2, axis=-1)
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLMBlock(nn.Layer):
    """Pre-norm transformer layer (the residual taken after the norm if the config says so, as THUDM allows)."""

    def __init__(self, config: ChatGLMv2Config):
        super().__init__()
        self.input_layernorm = _norm(config)
        self.self_attention = SelfAttention(config)
        self.post_attention_layernorm = _norm(config)
        self.mlp = MLP(config)
        self.hidden_dropout = Dropout(config.hidden_dropout)
        self.residual_after_norm = config.apply_residual_connection_post_layernorm

    def forward(
        self, hidden_states: Tensor, bias: Tensor, cos: Tensor, sin: Tensor, cache: Optional[LayerCache] = None
    ) -> Tuple[Tensor, LayerCache]:
        normed = self.input_layernorm(hidden_states)
        attention_output, new_cache = self.self_attention(normed, bias, cos, sin, cache)
        hidden_states = (normed if self.residual_after_norm else hidden_states) + self.hidden_dropout(attention_output)
        normed = self.post_attention_layernorm(hidden_states)
        hidden_states = (normed if self.residual_after_norm else hidden_states) + self.hidden_dropout(self.mlp(normed))
        return hidden_states, new_cache


class GLMTransformer(nn.Layer):
    """The layers and the final norm."""

    def __init__(self, config: ChatGLMv2Config):
        super().__init__()
        self.enable_recompute = False  # switched on by the Trainer's --recompute
        self.layers = nn.LayerList([GLMBlock(config) for _ in range(config.num_hidden_layers)])
        self.final_layernorm = _norm(config) if config.post_layer_norm else nn.Identity()

    def forward(
        self, hidden_states: Tensor, bias: Tensor, cos: Tensor, sin: Tensor, cache: Optional[KVCache] = None
    ) -> Tuple[Tensor, KVCache]:
        new_cache: KVCache = []
        for index, layer in enumerate(self.layers):
            if self.enable_recompute and self.training and not hidden_states.stop_gradient:
                # Keep no K/V here: holding them would keep alive what recompute frees.
                hidden_states, kv = recompute(_hidden_only, layer, hidden_states, bias, cos, sin), None
            else:
                hidden_states, kv = layer(hidden_states, bias, cos, sin, cache[index] if cache else None)
            new_cache.append(kv)
        return self.final_layernorm(hidden_states), new_cache


def _hidden_only(layer: GLMBlock, hidden_states: Tensor, bias: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return layer(hidden_states, bias, cos, sin)[0]


class Embedding(nn.Layer):
    """Word embeddings (vocabulary-parallel under tensor parallelism)."""

    def __init__(self, config: ChatGLMv2Config):
        super().__init__()
        if tensor_parallel_degree(config) > 1:
            self.word_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        else:
            self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.word_embeddings(input_ids)


def _concat_columns(parts: list):
    return paddle.concat(parts, axis=-1) if isinstance(parts[0], paddle.Tensor) else np.concatenate(parts, axis=-1)


def _qkv_widths(config: ChatGLMv2Config) -> Tuple[int, int, int, int]:
    """(whole Q width, whole K (= V) width, one rank's Q width, one rank's K width)."""
    groups, _ = kv_groups_per_rank(config)
    dim = head_dim(config)
    query, kv = config.num_attention_heads * dim, config.multi_query_group_num * dim
    return query, kv, query // tensor_parallel_degree(config), groups * dim


def _qkv_shard(tensor, config: ChatGLMv2Config):
    """Rank `config.tensor_parallel_rank`'s [Q_r | K_r | V_r] columns of a whole QKV weight or bias (a numpy array,
    a Paddle tensor or the lazy safetensors slice PaddleNLP's loader passes)."""
    query, kv, rank_query, rank_kv = _qkv_widths(config)
    rank = config.tensor_parallel_rank
    kv_start = rank // kv_groups_per_rank(config)[1] * rank_kv
    return _concat_columns([
        tensor[..., rank * rank_query:(rank + 1) * rank_query],
        tensor[..., query + kv_start:query + kv_start + rank_kv],
        tensor[..., query + kv + kv_start:query + kv + kv_start + rank_kv],
    ])


def _qkv_merge(shards: list, config: ChatGLMv2Config):
    """The whole [Q | K | V] from the ranks' shards (each group from the first rank holding it)."""
    _, _, rank_query, rank_kv = _qkv_widths(config)
    holders = shards[::kv_groups_per_rank(config)[1]]
    return _concat_columns([s[..., :rank_query] for s in shards]
                           + [s[..., rank_query:rank_query + rank_kv] for s in holders]
                           + [s[..., rank_query + rank_kv:] for s in holders])


_RANDOM_LAYERS = (nn.Linear, ColumnParallelLinear, RowParallelLinear, nn.Embedding, VocabParallelEmbedding)


class ChatGLMv2PretrainedModel(StrictLoading, PretrainedModel):
    """Loading, saving and initialisation with PaddleNLP's ChatGLMv2 files, names and config."""

    base_model_prefix = "chatglm_v2"
    config_class = ChatGLMv2Config
    resource_files_names = {"model_state": "model_state.pdparams"}
    pretrained_resource_files_map = CHATGLM_V2_PRETRAINED_RESOURCE_FILES_MAP
    # THUDM's PyTorch names (`transformer.` + ours, [out, in] linears) are PaddleNLP's mapping: reuse, don't copy.
    _get_name_mappings = _PaddleNLPChatGLMv2PretrainedModel._get_name_mappings

    def _init_weights(self, layer: nn.Layer) -> None:
        """Normal(0, initializer_range) projections and embeddings, zero biases; norms start at one.

        THUDM's `_init_weights` does nothing (its weights are always loaded) and PaddleNLP's port has none;
        this only matters for models trained from scratch.
        """
        if isinstance(layer, _RANDOM_LAYERS):
            nn.initializer.Normal(0.0, getattr(self.config, "initializer_range", 0.02))(layer.weight)
            if getattr(layer, "bias", None) is not None:
                nn.initializer.Constant(0.0)(layer.bias)

    @classmethod
    def _get_tensor_parallel_mappings(cls, config: ChatGLMv2Config, is_split: bool = True) -> Dict[str, Callable]:
        """How each tensor is split over N = `config.tensor_parallel_degree` ranks (or, `is_split=False`, the N
        shards joined), keyed by name under `chatglm_v2.`: for PaddleNLP's loader and `merge_tensor_parallel`
        save and for paddle_glm.checkpoint. PaddleNLP 2.8.1 has no rule for ChatGLMv2; the rule is:
        - rows (dim 0) in N blocks: `embedding.word_embeddings.weight` (vocabulary), `self_attention.dense.weight`,
          `mlp.dense_4h_to_h.weight`;
        - columns (last dim) in N blocks: `output_layer.weight` (vocabulary; not tied to the embeddings);
        - `mlp.dense_h_to_4h` weight (and bias), [gate | up]: each half in N blocks, rank r holds [gate_r | up_r];
        - `self_attention.query_key_value` weight and bias, [Q | K | V] with H query heads and G K/V groups: rank r
          holds [Q_r | K_r | V_r], Q_r its H/N heads; K_r, V_r its G/N groups when N <= G, else the one group
          r // (N/G) its heads read, which N/G ranks then hold alike (a merge takes each group from its first
          holder). N must divide H, and N and G must divide one another;
        - the rest (norms, `rotary_pos_emb.inv_freq`, row-parallel biases) is whole on every rank.
        """
        fn = split_or_merge_func(is_split, config.tensor_parallel_degree, config.tensor_parallel_rank,
                                 config.num_attention_heads)
        qkv = partial(_qkv_shard if is_split else _qkv_merge, config=config)
        rows, columns = partial(fn, is_column=False), partial(fn, is_column=True)
        gate_up = partial(fn, is_column=True, is_naive_2fuse=True)
        actions = {"embedding.word_embeddings.weight": rows, "output_layer.weight": columns}
        for index in range(config.num_hidden_layers):
            layer = f"encoder.layers.{index}."
            actions.update({
                layer + "self_attention.query_key_value.weight": qkv,
                layer + "self_attention.dense.weight": rows,
                layer + "mlp.dense_h_to_4h.weight": gate_up,
                layer + "mlp.dense_4h_to_h.weight": rows,
            })
            if config.add_bias_linear or config.add_qkv_bias:
                actions[layer + "self_attention.query_key_value.bias"] = qkv
            if config.add_bias_linear:
                actions[layer + "mlp.dense_h_to_4h.bias"] = gate_up
        return actions


@register_base_model
class ChatGLMv2Model(ChatGLMv2PretrainedModel):
    """Embeddings, rotary angles, the transformer and the (untied) output layer; returns hidden states and cache."""

    def __init__(self, config: ChatGLMv2Config):
        super().__init__(config)
        _check_config(config)
        self.embedding = Embedding(config)
        self.rotary_pos_emb = RotaryEmbedding(config)
        self.encoder = GLMTransformer(config)
        self.output_layer = parallel_linear(config, config.hidden_size, config.vocab_size, "column", bias=False)

    def get_input_embeddings(self) -> nn.Layer:
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value: nn.Layer) -> None:
        self.embedding.word_embeddings = value

    def forward(
        self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor, cache: Optional[KVCache] = None
    ) -> Tuple[Tensor, KVCache]:
        cache_length = cache[0][0].shape[1] if cache else 0
        bias = mask_bias(attention_mask, input_ids.shape[1], cache_length)  # (B, 1, q, cache + q)
        hidden_states = self.embedding(input_ids)  # (B, q, h)
        cos, sin = self.rotary_pos_emb(position_ids, hidden_states.dtype)
        return self.encoder(hidden_states, bias, cos, sin, cache)


class ChatGLMv2ForCausalLM(ChatGLMv2PretrainedModel):
    """ChatGLM2/3 with its output layer and a masked next-token loss."""

    def __init__(self, config: ChatGLMv2Config):
        super().__init__(config)
        self.chatglm_v2 = ChatGLMv2Model(config)

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        loss_mask: Optional[Tensor] = None,
        cache: Optional[KVCache] = None,
        label_smoothing: Optional[float] = None,
        num_logits_to_keep: int = 0,
        loss_positions_only: bool = False,
        return_dict: bool = True,
        use_cache: bool = True,
        logit_index: Optional[Tensor] = None,
    ):
        """Logits [B, S, V] (or of the last `num_logits_to_keep` positions, or of the positions `logit_index`:
        `layers.projected`), loss if `labels`, and the cache.

        `position_ids` [B, S] (default cache_len .. cache_len + S - 1; left-padded rows count from their
        first real token, as THUDM's tokenizer pads them). `attention_mask`: None (causal), 1-D sep [B]
        (0 = causal) or dense [B, 1, S, cache + S] 0/1. `labels` [B, S] are the tokens each position predicts
        (already shifted); `loss_mask` [B, S] selects the positions that count, or, without it, labels of -100
        are left out. `loss_positions_only` (training): project to the vocabulary only where the loss counts;
        logits then come back for those rows only, [N, V]. The cache holds each layer's (key, value)
        [B, T, groups, head_dim] after the rotary embedding; a decode step projects only its new tokens.
        """
        batch, length = input_ids.shape
        cache_length = cache[0][0].shape[1] if cache else 0
        if position_ids is None:
            position_ids = paddle.arange(cache_length, cache_length + length, dtype="int64")
            position_ids = position_ids.unsqueeze(0).expand([batch, length])
        if attention_mask is None:
            attention_mask = paddle.zeros([batch], dtype="int64")  # sep 0: causal
        hidden_states, new_cache = self.chatglm_v2(input_ids, position_ids, attention_mask, cache)
        hidden_states = projected(hidden_states, num_logits_to_keep, logit_index)
        if labels is not None and loss_mask is None:
            loss_mask = (labels != IGNORE_INDEX).astype("float32")
            labels = paddle.where(labels == IGNORE_INDEX, paddle.zeros_like(labels), labels)
        if loss_positions_only and labels is not None:
            hidden_states, labels, loss_mask = loss_positions(hidden_states, labels, loss_mask)
        if label_smoothing is None:
            label_smoothing = float(getattr(self.config, "label_smoothing", 0.0))
        # The output layer is split over the vocabulary like the embeddings, so their first row is this rank's.
        logits, loss = lm_head(self, hidden_states, self.chatglm_v2.output_layer.weight, labels, loss_mask,
                               label_smoothing, transpose_y=False,
                               vocab_start=getattr(self.chatglm_v2.embedding.word_embeddings, "start", 0))
        if not use_cache:
            new_cache = None
        if not return_dict:
            outputs = (logits, new_cache)
            return ((loss,) + outputs) if loss is not None else outputs
        return CausalLMOutputWithCrossAttentions(loss=loss, logits=logits, past_key_values=new_cache)


# ------------------------------------------------------------------------------------------------------------------
# The ChatGLM2/3 family: tokenizer, chat templates, registry entry
# ------------------------------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")  # after the sentencepiece pieces, in this order
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")  # ChatGLM3's, after those five
CHAT_FORMATS = ("chatglm2", "chatglm3")
# THUDM's Hugging Face config.json says model_type "chatglm" for ChatGLM-6B, ChatGLM2 and ChatGLM3 alike: these
# fields are ChatGLM2/3's (ChatGLM-6B's has position_encoding_2d and inner_hidden_size instead).
THUDM_CONFIG_FIELDS = ("multi_query_attention", "kv_channels", "padded_vocab_size", "rmsnorm")


class ChatGLMv2Tokenizer(_PaddleNLPChatGLMv2Tokenizer):
    """PaddleNLP's `ChatGLMv2Tokenizer`, with THUDM's special tokens per model and THUDM's text handling.

    - `chat_format` "chatglm2" registers THUDM ChatGLM2's five specials after the 64,789 pieces, "chatglm3" also
      ChatGLM3's four role tokens (PaddleNLP registers all nine for both models). The family's template follows
      from it: a tokenizer with role tokens is ChatGLM3's. It is saved in `tokenizer_config.json`, where PaddleNLP's
      class ignores it (the class name stays PaddleNLP's, so either side loads the other's files).
    - `encode_special_tokens` defaults to False as in THUDM's tokenizers: text is sentencepiece text, and a
      "</s>" or "[gMASK]" in a user's text never becomes a control token (PaddleNLP's default turns them into one).
    """

    def __init__(self, vocab_file: str, chat_format: str = "chatglm3", encode_special_tokens: bool = False, **kwargs):
        if chat_format not in CHAT_FORMATS:
            raise ValueError(f"chat_format {chat_format!r}: use one of {', '.join(CHAT_FORMATS)}")
        super().__init__(vocab_file, encode_special_tokens=encode_special_tokens, chat_format=chat_format, **kwargs)
        self.chat_format = chat_format
        if chat_format == "chatglm2":
            pieces = self.tokenizer  # PaddleNLP's SPTokenizer: drop what THUDM's ChatGLM2 tokenizer never had
            for token in ROLE_TOKENS:
                del pieces.index_special_tokens[pieces.special_tokens.pop(token)]
            pieces.n_words -= len(ROLE_TOKENS)
            names = list(pieces.special_tokens) + ["</s>", "<unk>"]
            pieces.special_token_expression = "|".join(re.escape(token) for token in names)

    @property
    def role_ids(self) -> Dict[str, int]:
        """ChatGLM3's role token ids by role ("user", ...); empty for ChatGLM2."""
        specials = self.tokenizer.special_tokens
        return {token[2:-2]: specials[token] for token in ROLE_TOKENS if token in specials}


def load_chatglm2_tokenizer(name_or_path: str, chat_format: Optional[str] = None) -> ChatGLMv2Tokenizer:
    """The tokenizer of a checkpoint or export directory, a model name, or a sentencepiece `.model` file.

    ChatGLM2 and ChatGLM3 share the sentencepiece model, so which one it is comes from `chat_format`, else from
    `tokenizer_config.json` (ours records it), else from the name (THUDM's files record `THUDM/chatglm2-6b`), and
    is ChatGLM3 when nothing says: PaddleNLP's tokenizer registers the role tokens. Every tokenizer is checked.
    """
    if os.path.isfile(name_or_path) and name_or_path.endswith(".model"):
        return _checked(ChatGLMv2Tokenizer(name_or_path, chat_format=chat_format or _format_from_name(name_or_path)))
    saved: dict = {}
    config_file = os.path.join(name_or_path, "tokenizer_config.json")
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as handle:
            saved = json.load(handle)
    chat_format = (chat_format or saved.get("chat_format")
                   or _format_from_name(saved.get("name_or_path") or name_or_path))
    return _checked(ChatGLMv2Tokenizer.from_pretrained(name_or_path, chat_format=chat_format))


def _format_from_name(name: str) -> str:
    return "chatglm2" if "chatglm2" in name.lower().replace("-", "").replace("_", "") else "chatglm3"


def _checked(tokenizer: ChatGLMv2Tokenizer) -> ChatGLMv2Tokenizer:
    """The specials must sit right after the sentencepiece pieces, with distinct ids (0 is `<unk>`, the pad), and the
    sentencepiece model must have `</s>`: other files would train and decode silently wrong."""
    pieces = tokenizer.tokenizer
    size = pieces.sp_model.vocab_size()
    names = SPECIAL_TOKENS + (ROLE_TOKENS if tokenizer.chat_format == "chatglm3" else ())
    ids = {name: pieces.special_tokens.get(name) for name in names}
    expected = {name: size + index for index, name in enumerate(names)}
    if ids != expected or len(pieces.special_tokens) != len(names):
        raise ValueError(f"{tokenizer.chat_format} tokenizer: special tokens {pieces.special_tokens}, expected "
                         f"{expected} after the {size} sentencepiece pieces")
    if tokenizer.eos_token_id in (None, -1, tokenizer.pad_token_id) or tokenizer.eos_token_id >= size:
        raise ValueError(f"the sentencepiece model has no usable </s> (eos id {tokenizer.eos_token_id}, pad "
                         f"{tokenizer.pad_token_id}): not ChatGLM2/3's tokenizer.model")
    return tokenizer


class ChatGLM2Template(Template):
    """ChatGLM2-6B's chat format, as THUDM's `build_prompt` and `chat()` render it (PaddleNLP's `build_prompt` is
    the same): `[gMASK] sop` + the tokens of the whole string

        [Round 1]\\n\\n问：{q1}\\n\\n答：{a1}\\n\\n[Round 2]\\n\\n问：{query}\\n\\n答：

    rounds counted from 1. The answer follows with `</s>`; positions count 0, 1, ... from `[gMASK]`, causal
    attention throughout (sep 0), each generated token one position further.
    """

    def __init__(self, tokenizer: ChatGLMv2Tokenizer):
        super().__init__(tokenizer)
        self.prefix = [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]

    @property
    def stop_ids(self) -> Tuple[int, ...]:
        return (self.tokenizer.eos_token_id,)

    def encode(self, text: str) -> List[int]:
        """THUDM: sentencepiece's ids of the text alone (no special token is ever read out of text)."""
        return self.tokenizer.tokenizer.encode(text)

    def render(self, query: str, history: History) -> List[int]:
        return self.prefix + self.encode(self.tokenizer.build_prompt(query, list(history)))

    def completion_prompt(self, text: str) -> List[int]:
        """What THUDM's tokenizer makes of plain text: `[gMASK] sop` + its tokens, no chat format."""
        return self.prefix + self.encode(text)

    def response(self, ids: Sequence[int]) -> str:
        """THUDM's `process_response` strips the answer (its "[[训练时间]]" placeholder of THUDM's own training
        data is left alone: fine-tuned answers are scored as generated)."""
        return self.decode(ids).strip()

    def special_ids(self) -> Dict[str, object]:
        return {**super().special_ids(), "eos": self.tokenizer.eos_token_id, "gmask": self.prefix[0],
                "sop": self.prefix[1]}


class ChatGLM3Template(ChatGLM2Template):
    """ChatGLM3-6B's chat format, as THUDM's `build_chat_input` renders it: `[gMASK] sop`, then each message as its
    role token + the tokens of "{metadata}\\n" (metadata empty) + the tokens of its content, and `<|assistant|>`:

        [gMASK] sop <|user|> ▁\\n {q1} <|assistant|> ▁\\n {a1} <|user|> ▁\\n {query} <|assistant|>

    The model answers "\\n" + content (an empty metadata line first), so that is the training target, with loss on
    those tokens and `</s>` (THUDM's fine-tuning). Generation stops at `</s>`, `<|user|>` or `<|observation|>`.
    """

    def __init__(self, tokenizer: ChatGLMv2Tokenizer):
        super().__init__(tokenizer)
        self.roles = tokenizer.role_ids

    @property
    def stop_ids(self) -> Tuple[int, ...]:
        return (self.tokenizer.eos_token_id, self.roles["user"], self.roles["observation"])

    def message(self, role: str, content: str) -> List[int]:
        """THUDM's `build_single_message(role, "", content)`."""
        return [self.roles[role]] + self.encode("\n") + self.encode(content)

    def render(self, query: str, history: History) -> List[int]:
        ids = list(self.prefix)
        for old_query, answer in history:
            ids += self.message("user", old_query) + self.message("assistant", answer)
        return ids + self.message("user", query) + [self.roles["assistant"]]

    def target_ids(self, response: str) -> List[int]:
        return self.encode("\n") + self.encode(response)

    def response(self, ids: Sequence[int]) -> str:
        """THUDM's `process_response`: the last assistant message of the output, stripped; its metadata line, empty
        for an answer, goes with the leading white space (a non-empty one names a tool call: kept, as text)."""
        ids = list(ids)
        assistant = self.roles["assistant"]
        return super().response(ids[len(ids) - ids[::-1].index(assistant):] if assistant in ids else ids)

    def special_ids(self) -> Dict[str, object]:
        return {**super().special_ids(), **self.roles}


class ChatGLM2Family(Family):
    """THUDM's ChatGLM2-6B and ChatGLM3-6B: one architecture, causal with 1-D positions; the tokenizer tells them
    apart (role tokens: ChatGLM3's template)."""

    name = "chatglm2"
    model_types = ("chatglm_v2",)
    name_patterns = ("chatglm2", "chatglm3")
    tokenizer_classes = ("ChatGLMv2Tokenizer",)
    position_rows = 1

    @property
    def model_class(self):
        return ChatGLMv2ForCausalLM

    def claims(self, config: dict) -> bool:
        return super().claims(config) or (
            config.get("model_type") == "chatglm" and "position_encoding_2d" not in config
            and any(field in config for field in THUDM_CONFIG_FIELDS))

    def load_tokenizer(self, name_or_path: str) -> ChatGLMv2Tokenizer:
        return load_chatglm2_tokenizer(name_or_path)

    def template(self, tokenizer: ChatGLMv2Tokenizer) -> ChatGLM2Template:
        has_roles = all(token in tokenizer.tokenizer.special_tokens for token in ROLE_TOKENS)
        return (ChatGLM3Template if has_roles else ChatGLM2Template)(tokenizer)

    def kv_heads(self, config: ChatGLMv2Config) -> int:
        return int(config.multi_query_group_num)

    def head_dim(self, config: ChatGLMv2Config) -> int:
        return head_dim(config)

    def tensor_parallel_problems(self, config: ChatGLMv2Config, degree: int) -> List[str]:
        """N ranks: N divides the query heads and the vocabulary (base rules), the SwiGLU width, and N and the K/V
        groups divide one another (groups split when N <= groups, else replicated on N / groups ranks each)."""
        problems = super().tensor_parallel_problems(config, degree)
        groups, ffn = int(config.multi_query_group_num), int(config.ffn_hidden_size)
        if groups % degree and degree % groups:
            problems.append(f"--tensor_parallel_degree {degree} and the model's {groups} K/V groups must divide one "
                            f"another (a rank's query heads read whole groups): use a divisor or multiple of {groups}")
        if ffn % degree:
            problems.append(f"--tensor_parallel_degree {degree} does not divide the model's MLP width {ffn}")
        return problems

    @property
    def release(self) -> "ChatGLMv2Release":
        return ChatGLMv2Release()

    def prepare_lora(self, lora_model) -> None:
        """K/V columns of a QKV adapter's B that several ranks hold alike get their gradient summed, as the weight's."""
        for layer in lora_model.model.sublayers():
            if isinstance(layer, SelfAttention) and layer.replica_hook is not None:
                adapter = getattr(layer.query_key_value, "lora_B", None)
                if adapter is not None:
                    adapter.register_hook(layer.replica_hook)


# ------------------------------------------------------------------------------------------------------------------
# ChatGLM2/3's published checkpoints (paddle_glm.convert)
# ------------------------------------------------------------------------------------------------------------------

class ChatGLMv2Release(Release):
    """THUDM/chatglm2-6b, chatglm3-6b (and -32k, -base): 7 fp16 shards (`.bin` or safetensors) with an index,
    `tokenizer.model`."""

    model_class = ChatGLMv2ForCausalLM
    tokenizer_file = "tokenizer.model"
    hf_tokenizer = THUDM_CHATGLM_TOKENIZER
    hf_constants = {
        "model_type": "chatglm", "architectures": ["ChatGLMModel"],
        "auto_map": {**THUDM_CHATGLM_MODEL_CODE,
                     "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
                     "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification"},
        # Spelled out: THUDM's ChatGLMConfig defaults to multi_query_attention False and transformers' configs to
        # tie_word_embeddings True; our model is multi-query attention with an untied output layer.
        "multi_query_attention": True, "tie_word_embeddings": False,
    }
    hf_fields = (  # THUDM's ChatGLMConfig (chatglm2-6b's and chatglm3-6b's configuration_chatglm.py)
        "num_layers", "padded_vocab_size", "hidden_size", "ffn_hidden_size", "kv_channels", "num_attention_heads",
        "seq_length", "hidden_dropout", "classifier_dropout", "attention_dropout", "layernorm_epsilon", "rmsnorm",
        "apply_residual_connection_post_layernorm", "post_layer_norm", "add_bias_linear", "add_qkv_bias",
        "bias_dropout_fusion", "multi_query_group_num", "rope_ratio", "apply_query_key_layer_scaling",
        "attention_softmax_in_fp32", "fp32_residual_connection", "quantization_bit", "pre_seq_len",
        "prefix_projection", "original_rope", "eos_token_id", "pad_token_id", "use_cache",
    )


FAMILY = ChatGLM2Family()
