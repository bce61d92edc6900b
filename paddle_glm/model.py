"""GLM (THUDM's General Language Model) for conditional generation, with a real K/V cache.

Read top-down: attention -> MLP -> block -> stack -> model -> generation head. State-dict keys, shapes
and layouts are those of `paddlenlp.transformers.GLMForConditionalGeneration` (linear weights stored
[in, out], QKV fused as [q | k | v], output projection tied to `glm.word_embeddings`), so checkpoints
move between the two unchanged. What differs from PaddleNLP's model:
- the cache holds per-layer keys and values, so a decode step projects only its new tokens
  (PaddleNLP caches hidden states and re-projects the whole prefix at every step);
- a 1-D "sep" attention mask really is expanded (PaddleNLP's `attention_mask.dim == 1` never holds);
- `num_logits_to_keep` lets generation compute the 50k-wide output projection for the last
  position only.

Attention mask conventions (all masks are 0/1, 1 = may attend):
- 1-D `[B]` "sep": keys `j < sep` (part A) are visible to every query, part B is causal;
- dense `[B, 1, q, k]` with `k = cache_len + q`: used as given (generation with padded prompts).
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
from paddle.distributed.fleet.utils import recompute
from paddlenlp.transformers import PretrainedModel, register_base_model
from paddlenlp.transformers.glm.configuration import (
    GLM_PRETRAINED_INIT_CONFIGURATION,
    GLM_PRETRAINED_RESOURCE_FILES_MAP,
    GLMConfig,
)
from paddlenlp.transformers.glm.modeling import GLMPretrainedModel as _PaddleNLPGLMPretrainedModel
from paddlenlp.transformers.model_outputs import CausalLMOutputWithCrossAttentions

from .parallel import (
    ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, copy_to_model_parallel,
    gather_from_model_parallel, parallel_cross_entropy, tensor_parallel_degree,
)

__all__ = ["GLMConfig", "GLMModel", "GLMPretrainedModel", "GLMForConditionalGeneration", "KVCache"]

# One (key, value) pair per layer, each [batch, cache_len, num_heads, head_dim].
KVCache = List[Tuple[Tensor, Tensor]]

# Additive bias for masked scores: the most negative fp16 number, as PaddleNLP's GLM uses, so that
# fp32, fp16 and bf16 runs mask identically.
_MASKED = -65504.0


def sep_to_dense_mask(sep: Tensor, query_length: int, cache_length: int = 0) -> Tensor:
    """Expand per-sample part-A lengths `sep` [B] into a dense 0/1 mask [B, 1, q, cache + q]."""
    total = cache_length + query_length
    rows = paddle.arange(cache_length, total, dtype="int64").reshape([1, -1, 1])
    cols = paddle.arange(0, total, dtype="int64").reshape([1, 1, -1])
    visible = (cols <= rows) | (cols < sep.astype("int64").reshape([-1, 1, 1]))
    return visible.astype("float32").unsqueeze(1)


def _linear(config: GLMConfig, in_features: int, out_features: int, split: str) -> nn.Layer:
    """nn.Linear, or its column/row-parallel form when the config asks for tensor parallelism."""
    if tensor_parallel_degree(config) == 1:
        return nn.Linear(in_features, out_features)
    return (ColumnParallelLinear if split == "column" else RowParallelLinear)(in_features, out_features)


class GLMAttention(nn.Layer):
    """Multi-head self-attention over a fused QKV projection, appending to a K/V cache."""

    def __init__(self, config: GLMConfig):
        super().__init__()
        if config.hidden_size % config.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({config.hidden_size}) must be a multiple of num_attention_heads "
                f"({config.num_attention_heads})"
            )
        degree = tensor_parallel_degree(config)
        if config.num_attention_heads % degree:
            raise ValueError(f"--tensor_parallel_degree {degree} does not divide the {config.num_attention_heads} "
                             "attention heads: choose a divisor")
        self.num_heads = config.num_attention_heads // degree  # this rank's heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.use_flash_attention = bool(getattr(config, "use_flash_attention", False))
        self.dropout_p = config.attention_dropout_prob
        # A tensor-parallel shard of QKV is laid out per head, [q_h | k_h | v_h] for each of its heads
        # (PaddleNLP's split rule); the whole matrix is [q | k | v].
        self.per_head_qkv = degree > 1
        self.query_key_value = _linear(config, config.hidden_size, 3 * config.hidden_size, "column")
        self.dense = _linear(config, config.hidden_size, config.hidden_size, "row")
        self.attention_dropout = nn.Dropout(config.attention_dropout_prob)
        self.output_dropout = nn.Dropout(config.output_dropout_prob)

    def forward(
        self, hidden_states: Tensor, mask_bias: Tensor, cache: Optional[Tuple[Tensor, Tensor]] = None
    ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        batch, length = hidden_states.shape[0], hidden_states.shape[1]
        mixed = self.query_key_value(hidden_states)  # (B, q, 3 * nh * hd)
        shape = [batch, length, self.num_heads, self.head_dim]
        if self.per_head_qkv:
            query, key, value = paddle.split(mixed.reshape([batch, length, self.num_heads, 3 * self.head_dim]), 3, axis=-1)
        else:
            query, key, value = (part.reshape(shape) for part in paddle.split(mixed, 3, axis=-1))  # (B, q, nh, hd)
        if cache is not None:
            key = paddle.concat([cache[0], key], axis=1)  # (B, cache + q, nh, hd)
            value = paddle.concat([cache[1], value], axis=1)
        context = self._attend(query, key, value, mask_bias)  # (B, q, nh, hd)
        output = self.dense(context.reshape([batch, length, self.num_heads * self.head_dim]))
        return self.output_dropout(output), (key, value)

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, mask_bias: Tensor) -> Tensor:
        """softmax(q k^T / sqrt(hd) + bias) v, fused where the device supports it."""
        if self.use_flash_attention:
            return F.scaled_dot_product_attention(
                query, key, value, attn_mask=mask_bias.astype(query.dtype),
                dropout_p=self.dropout_p, training=self.training,
            )
        # The queries are scaled, not the (q, k) scores: in a decode step q = 1 while k is the whole cache.
        query = query.transpose([0, 2, 1, 3]) * (1.0 / math.sqrt(self.head_dim))  # (B, nh, q, hd)
        key = key.transpose([0, 2, 1, 3])  # (B, nh, k, hd)
        value = value.transpose([0, 2, 1, 3])  # (B, nh, k, hd)
        scores = paddle.matmul(query, key, transpose_y=True).astype("float32")  # (B, nh, q, k)
        # In place: every (q, k)-sized pass that allocates costs as much as the pass itself on CPU.
        probs = F.softmax_(scores.add_(mask_bias), axis=-1)
        probs = self.attention_dropout(probs.astype(value.dtype))
        return paddle.matmul(probs, value).transpose([0, 2, 1, 3])


class GLMMLP(nn.Layer):
    """h -> 4h -> gelu(tanh) -> h, as GLM's GPT-2 style MLP."""

    def __init__(self, config: GLMConfig):
        super().__init__()
        self.dense_h_to_4h = _linear(config, config.hidden_size, 4 * config.hidden_size, "column")
        self.dense_4h_to_h = _linear(config, 4 * config.hidden_size, config.hidden_size, "row")
        self.dropout = nn.Dropout(config.output_dropout_prob)
        # Exported graphs spell tanh-GELU out in elementary ops: paddle2onnx turns the fused
        # `gelu(approximate=True)` into exact (erf) GELU, which would shift ONNX logits by ~1e-3.
        self.gelu_as_formula = False

    def forward(self, hidden_states: Tensor) -> Tensor:
        hidden_states = self.dense_h_to_4h(hidden_states)
        if self.gelu_as_formula:
            cubic = hidden_states + 0.044715 * hidden_states * hidden_states * hidden_states
            hidden_states = 0.5 * hidden_states * (1.0 + paddle.tanh(math.sqrt(2.0 / math.pi) * cubic))
        else:
            hidden_states = F.gelu(hidden_states, approximate=True)
        return self.dropout(self.dense_4h_to_h(hidden_states))


class GLMBlock(nn.Layer):
    """Pre-LayerNorm transformer layer."""

    def __init__(self, config: GLMConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, epsilon=config.layernorm_epsilon)
        self.attention = GLMAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, epsilon=config.layernorm_epsilon)
        self.mlp = GLMMLP(config)

    def forward(
        self, hidden_states: Tensor, mask_bias: Tensor, cache: Optional[Tuple[Tensor, Tensor]] = None
    ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        attention_output, new_cache = self.attention(self.input_layernorm(hidden_states), mask_bias, cache)
        hidden_states = hidden_states + attention_output
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, new_cache


class GLMStack(nn.Layer):
    """Embeds positions (GLM's 2-D block positions) and runs the layers."""

    def __init__(self, config: GLMConfig):
        super().__init__()
        self.block_position_encoding = config.block_position_encoding
        self.enable_recompute = False  # switched on by the Trainer's --recompute
        init = nn.initializer.Normal(mean=0.0, std=config.initializer_range)
        positions = config.max_sequence_length + (1 if config.block_position_encoding else 0)
        self.position_embeddings = nn.Embedding(positions, config.hidden_size, weight_attr=paddle.ParamAttr(initializer=init))
        if config.block_position_encoding:
            self.block_position_embeddings = nn.Embedding(
                config.max_sequence_length + 1, config.hidden_size, weight_attr=paddle.ParamAttr(initializer=init)
            )
        self.embedding_dropout = nn.Dropout(config.embedding_dropout_prob)
        self.layers = nn.LayerList([GLMBlock(config) for _ in range(config.num_layers)])
        self.final_layernorm = nn.LayerNorm(config.hidden_size, epsilon=config.layernorm_epsilon)

    def forward(
        self, hidden_states: Tensor, position_ids: Tensor, attention_mask: Tensor, cache: Optional[KVCache] = None
    ) -> Tuple[Tensor, KVCache]:
        query_length = hidden_states.shape[1]
        cache_length = cache[0][0].shape[1] if cache else 0
        if attention_mask.ndim == 1:
            attention_mask = sep_to_dense_mask(attention_mask, query_length, cache_length)
        mask_bias = (1.0 - attention_mask.astype("float32")) * _MASKED  # (B, 1, q, cache + q)

        if self.block_position_encoding:
            hidden_states = hidden_states + self.position_embeddings(position_ids[:, 0])
            hidden_states = hidden_states + self.block_position_embeddings(position_ids[:, 1])
        else:
            hidden_states = hidden_states + self.position_embeddings(position_ids)
        hidden_states = self.embedding_dropout(hidden_states)

        new_cache: KVCache = []
        for index, layer in enumerate(self.layers):
            layer_cache = cache[index] if cache else None
            if self.enable_recompute and self.training and not hidden_states.stop_gradient:
                # Keep no K/V here: holding them would keep alive what recompute frees.
                hidden_states, kv = recompute(_hidden_only, layer, hidden_states, mask_bias), None
            else:
                hidden_states, kv = layer(hidden_states, mask_bias, layer_cache)
            new_cache.append(kv)
        return self.final_layernorm(hidden_states), new_cache


def _hidden_only(layer: GLMBlock, hidden_states: Tensor, mask_bias: Tensor) -> Tensor:
    return layer(hidden_states, mask_bias)[0]


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


class GLMPretrainedModel(PretrainedModel):
    """Loading, saving and initialisation shared with PaddleNLP's GLM (same files, names and splits)."""

    base_model_prefix = "glm"
    config_class = GLMConfig
    resource_files_names = {"model_state": "model_state.pdparams"}
    pretrained_init_configuration = GLM_PRETRAINED_INIT_CONFIGURATION
    pretrained_resource_files_map = GLM_PRETRAINED_RESOURCE_FILES_MAP
    # Same tensor-parallel split rules and PyTorch name mappings as PaddleNLP's GLM: reuse, don't copy.
    _get_tensor_parallel_mappings = _PaddleNLPGLMPretrainedModel._get_tensor_parallel_mappings
    _get_name_mappings = _PaddleNLPGLMPretrainedModel._get_name_mappings
    _init_weights = _PaddleNLPGLMPretrainedModel._init_weights

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """PaddleNLP's loader, made strict: a missing, unreadable or partial checkpoint is an error.

        PaddleNLP only warns when tensors are missing and leaves them randomly initialised.
        """
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


@register_base_model
class GLMModel(GLMPretrainedModel):
    """Word embeddings + transformer stack; returns final hidden states and the K/V cache."""

    def __init__(self, config: GLMConfig):
        super().__init__(config)
        attr = paddle.ParamAttr(initializer=nn.initializer.XavierNormal())
        if tensor_parallel_degree(config) > 1:
            self.word_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size, weight_attr=attr)
        else:
            self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, weight_attr=attr)
        self.transformer = GLMStack(config)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.word_embeddings = value

    def forward(
        self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor, cache: Optional[KVCache] = None
    ) -> Tuple[Tensor, KVCache]:
        return self.transformer(self.word_embeddings(input_ids), position_ids, attention_mask, cache)


class GLMForConditionalGeneration(GLMPretrainedModel):
    """GLM with its tied language-model head and GLM's blank-infilling loss."""

    def __init__(self, config: GLMConfig):
        super().__init__(config)
        config.output_predict = True
        self.glm = GLMModel(config)

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
    ):
        """Logits [B, S, V] (or the last `num_logits_to_keep` positions), loss if `labels`, and the cache.

        `position_ids` [B, 2, S]: row 0 absolute positions (part B tokens sit at their mask's position),
        row 1 block positions (0 in part A, 1, 2, ... in part B). Defaults: 0..S-1 and zeros.
        `attention_mask`: 1-D sep [B] or dense [B, 1, S, cache + S]; default: fully bidirectional.
        `loss_mask` [B, S] selects the positions whose `labels` count (mean over selected positions).
        `loss_positions_only` (training): project to the vocabulary only where `loss_mask` is set, the
        target part, typically a fifth of the positions; logits then come back for those rows only, [N, V].
        """
        batch, length = input_ids.shape
        cache_length = cache[0][0].shape[1] if cache else 0
        if position_ids is None:
            position_ids = _default_position_ids(batch, length, cache_length)
        if attention_mask is None:
            attention_mask = paddle.full([batch], cache_length + length, dtype="int64")
        hidden_states, new_cache = self.glm(input_ids, position_ids, attention_mask, cache)
        if num_logits_to_keep:
            hidden_states = hidden_states[:, -num_logits_to_keep:]
        if loss_positions_only and labels is not None and loss_mask is not None:
            hidden_states, labels, loss_mask = _loss_positions(hidden_states, labels, loss_mask)
        if label_smoothing is None:
            label_smoothing = float(getattr(self.config, "label_smoothing", 0.0))
        if tensor_parallel_degree(self.config) > 1:
            logits, loss = self._parallel_head(hidden_states, labels, loss_mask, label_smoothing)
        else:
            logits = paddle.matmul(hidden_states, self.glm.word_embeddings.weight, transpose_y=True)
            loss = None if labels is None else glm_loss(logits, labels, loss_mask, label_smoothing)
        if not use_cache:
            new_cache = None
        if not return_dict:
            outputs = (logits, new_cache)
            return ((loss,) + outputs) if loss is not None else outputs
        return CausalLMOutputWithCrossAttentions(loss=loss, logits=logits, past_key_values=new_cache)

    def _parallel_head(self, hidden_states: Tensor, labels: Optional[Tensor], loss_mask: Optional[Tensor],
                       label_smoothing: float):
        """Vocabulary-sharded logits: the loss never gathers them (they are returned sharded with a loss);
        without labels (generation) they are gathered whole."""
        embeddings = self.glm.word_embeddings
        logits = paddle.matmul(copy_to_model_parallel(hidden_states), embeddings.weight, transpose_y=True)
        if labels is None:
            return gather_from_model_parallel(logits), None
        token_loss = parallel_cross_entropy(logits, labels, embeddings.start, self.config.vocab_size, label_smoothing)
        return logits, _masked_mean(token_loss, loss_mask)


def _loss_positions(hidden_states: Tensor, labels: Tensor, loss_mask: Tensor):
    """The rows of the flattened batch whose loss mask is set (hidden [N, H], labels [N], mask [N])."""
    mask = loss_mask.reshape([-1]).astype("float32")
    index = paddle.nonzero(mask > 0).squeeze(-1)
    hidden_states = paddle.index_select(hidden_states.reshape([-1, hidden_states.shape[-1]]), index)
    return hidden_states, paddle.index_select(labels.reshape([-1]), index), paddle.index_select(mask, index)


def _default_position_ids(batch: int, length: int, start: int) -> Tensor:
    positions = paddle.arange(start, start + length, dtype="int64")
    return paddle.stack([positions, paddle.zeros_like(positions)]).unsqueeze(0).expand([batch, 2, length])


def glm_loss(logits: Tensor, labels: Tensor, loss_mask: Optional[Tensor], label_smoothing: float = 0.0) -> Tensor:
    """Masked mean of token cross-entropy, with label smoothing over the whole vocabulary.

    Per token: (1 - eps) * (-log p[label]) + eps * mean_v(-log p[v]) — the same objective as
    PaddleNLP's GLM and `F.cross_entropy(label_smoothing=eps)`, computed in float32 as
    logsumexp(x) - (1 - eps) * x[label] - eps * mean(x). (Paddle's CPU `log_softmax` kernel is ~25x
    slower than `logsumexp` and dominated the demo's training step.)
    """
    logits = logits.astype("float32")
    log_normalizer = paddle.logsumexp(logits, axis=-1)
    target = paddle.take_along_axis(logits, labels.astype("int64").unsqueeze(-1), axis=-1).squeeze(-1)
    token_loss = log_normalizer - target
    if label_smoothing > 0:
        token_loss = log_normalizer - (1.0 - label_smoothing) * target - label_smoothing * logits.mean(axis=-1)
    return _masked_mean(token_loss, loss_mask)


def _masked_mean(token_loss: Tensor, loss_mask: Optional[Tensor]) -> Tensor:
    if loss_mask is None:
        return token_loss.mean()
    loss_mask = loss_mask.astype("float32").reshape(token_loss.shape)
    return (token_loss * loss_mask).sum() / loss_mask.sum().clip(min=1.0)
