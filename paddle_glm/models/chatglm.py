"""ChatGLM-6B (THUDM's first ChatGLM) as a causal language model, with a real K/V cache.

Read top-down: rotary positions -> attention -> MLP -> block -> stack -> model -> language-model head.
State-dict keys, shapes and layouts are those of PaddleNLP 2.8.1's `ChatGLMForCausalLM` (`chatglm.transformer...`,
linear weights stored [in, out], QKV fused per head as [q_h | k_h | v_h] for each head, output projection tied to
`chatglm.transformer.word_embeddings`), and the config is its `ChatGLMConfig`, so checkpoints move between the two
unchanged. The computation follows THUDM's `modeling_chatglm.py` for chatglm-6b, which the released weights were
trained and served with. Where PaddleNLP's port differs, THUDM wins (each place is marked "THUDM, not PaddleNLP"):
- the rotary inverse frequencies are rounded to half precision (THUDM's `inv_freq.half()`; exact float32
  frequencies move the 6B model's logits by ~1e-2), and in a half-precision model the rotary table itself is
  half precision, as THUDM's `.half()` leaves it;
- masked attention scores are *filled* with -10000 before the query-key scaling coefficient multiplies them, so a
  fully masked (padding) row attends uniformly; PaddleNLP adds the dtype's minimum after it instead, which in half
  precision leaves such rows to their raw scores;
- the loss is a mean over the counted positions (THUDM's CrossEntropyLoss); PaddleNLP's (Paddle's cross_entropy
  with ignore_index) divides by every position, the ignored ones included.
What differs from both: the cache holds keys and values [B, T, heads, head_dim] batch-first, a decode step projects
only its new tokens; masks and positions are given (see below; defaults as GLM's: fully bidirectional, positions
0, 1, ...) rather than searched for in `input_ids`; the loss takes labels aligned with the positions and a loss
mask, as every family of this toolkit does (THUDM shifts labels inside the model, PaddleNLP takes -100 for ignored
labels).

Inputs:
- `position_ids` [B, 2, S]: row 0 the token position (everything from `<sop>` on sits at the `[gMASK]` position),
  row 1 the block position (0 before `<sop>`, then 1, 2, ...). Left padding: pads at 0, positions counted from the
  first real token, as THUDM's tokenizer pads.
- attention masks are 0/1 (1 = may attend): 1-D `[B]` "sep" = the index of `<sop>` (the prefix before it is
  bidirectional, causal from `<sop>` on), or dense `[B, 1, q, cache + q]`, used as given (padding hidden).
"""
from __future__ import annotations

import math
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle import Tensor
from paddle.distributed.fleet.utils import recompute
from paddlenlp.transformers import PretrainedModel, PretrainedTokenizer, register_base_model
from paddlenlp.transformers.chatglm.configuration import CHATGLM_PRETRAINED_RESOURCE_FILES_MAP, ChatGLMConfig
from paddlenlp.transformers.chatglm.modeling import ChatGLMPretrainedModel as _PaddleNLPChatGLMPretrainedModel
from paddlenlp.transformers.chatglm.tokenizer import ChatGLMTokenizer as _PaddleNLPChatGLMTokenizer
from paddlenlp.transformers.conversion_utils import StateDictNameMapping
from paddlenlp.transformers.model_outputs import CausalLMOutputWithCrossAttentions
from paddlenlp.utils.initializer import normal_, ones_, zeros_

from ..parallel import VocabParallelEmbedding, tensor_parallel_degree
from .family import Family, History, Template
from .layers import (
    KVCache, StrictLoading, attend_cached, default_position_ids, lm_head, loss_positions, mask_bias, parallel_linear,
    projected, rows_first_projection,
)
from .release import THUDM_CHATGLM_MODEL_CODE, THUDM_CHATGLM_TOKENIZER, Derived, Release

__all__ = ["ChatGLMConfig", "ChatGLMModel", "ChatGLMPretrainedModel", "ChatGLMForCausalLM",
           "rotary_inverse_frequencies", "rotary_tables", "apply_rotary", "ChatGLMTokenizer", "load_chatglm_tokenizer",
           "ChatGLMTemplate", "ChatGLMFamily", "FAMILY"]

ROTARY_BASE = 10000.0
MASK_FILL = -10000.0  # THUDM's masked_fill value for attention scores


def _check_supported(config: ChatGLMConfig) -> None:
    """One error naming every setting of `ChatGLMConfig` that ChatGLM-6B does not use and this module lacks."""
    degree = tensor_parallel_degree(config)
    heads, hidden = config.num_attention_heads, config.hidden_size
    problems = [
        text for failed, text in (
            (not config.position_encoding_2d, "position_encoding_2d=False (ChatGLM-6B uses 2-D positions)"),
            (config.pre_seq_len is not None, "pre_seq_len (P-Tuning v2 prefixes): use LoRA"),
            (bool(config.quantization_bit), "quantization_bit: load the float16 weights"),
            (config.activation != "gelu", f"activation={config.activation!r} (only 'gelu')"),
            (not config.attention_scale, "attention_scale=False"),
            (config.use_long_sequence_strategies, "use_long_sequence_strategies"),
            (hidden % heads, f"hidden_size {hidden} not a multiple of num_attention_heads {heads}"),
            (hidden % heads == 0 and (hidden // heads) % 4, "head_dim not a multiple of 4 (two rotary halves)"),
            (heads % degree, f"--tensor_parallel_degree {degree} does not divide the {heads} attention heads"),
        ) if failed
    ]
    if problems:
        raise ValueError("unsupported ChatGLM config: " + "; ".join(problems))


def rotary_inverse_frequencies(head_dim: int) -> Tensor:
    """[head_dim / 4] float32 inverse frequencies of one rotary half, rounded to float16 as THUDM's are
    (THUDM, not PaddleNLP, which keeps them float32)."""
    rotary_dim = head_dim // 2
    exponents = paddle.arange(0, rotary_dim, 2, dtype="float32") / rotary_dim
    return (1.0 / (ROTARY_BASE ** exponents)).astype("float16").astype("float32")


def rotary_tables(position_ids: Tensor, inv_freq: Tensor, dtype) -> Tuple[Tensor, Tensor]:
    """cos, sin [B, S, 1, head_dim] in `dtype` (the model's): the first half of each head turns with the token
    position (row 0 of `position_ids` [B, 2, S]), the second half with the block position (row 1).

    THUDM, not PaddleNLP (which computes float32 tables and casts them): the table has the precision of THUDM's
    `inv_freq` buffer, float32 after `.float()` (float64 after `.double()`), float16 otherwise (`.half()` models,
    and bfloat16 ones whose buffer stays half). A float16 table is computed here in float32, rounding positions,
    angles and cos/sin to float16 at each step: THUDM's numbers (a product of two halves is exact in float32), on
    CPUs without half-precision kernels too.
    """
    half = dtype not in (paddle.float32, paddle.float64)
    compute = paddle.float32 if half else dtype

    def rounded(tensor: Tensor) -> Tensor:
        return tensor.astype(paddle.float16).astype(compute) if half else tensor

    positions = rounded(position_ids.astype(compute)).unsqueeze(-1)  # (B, 2, S, 1)
    angles = rounded(positions * rounded(inv_freq.astype(compute)))  # (B, 2, S, hd/4)
    angles = paddle.concat([angles, angles], axis=-1).transpose([0, 2, 1, 3])  # (B, S, 2, hd/2)
    angles = angles.reshape([angles.shape[0], angles.shape[1], 1, -1])  # (B, S, 1, hd): token half | block half
    return rounded(paddle.cos(angles)).astype(dtype), rounded(paddle.sin(angles)).astype(dtype)


def apply_rotary(states: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each half of every head of [B, S, nh, hd] by its angles, THUDM's `rotate_half` style: a half
    [x1 | x2] becomes [x1 | x2] * cos + [-x2 | x1] * sin."""
    x1, x2, x3, x4 = paddle.split(states, 4, axis=-1)
    return states * cos + paddle.concat([-x2, x1, -x4, x3], axis=-1) * sin


class ChatGLMAttention(nn.Layer):
    """Self-attention over a per-head fused QKV with 2-D rotary positions and THUDM's layer scaling."""

    def __init__(self, config: ChatGLMConfig, layer_id: int):
        super().__init__()
        self.num_heads = config.num_attention_heads // tensor_parallel_degree(config)  # this rank's heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.coeff = float(layer_id + 1)  # THUDM's query_key_layer_scaling_coeff
        self.use_flash_attention = bool(getattr(config, "use_flash_attention", False))
        # Laid out per head, [q_h | k_h | v_h] for each head: a column-parallel shard holds whole heads.
        self.query_key_value = parallel_linear(config, config.hidden_size, 3 * config.hidden_size, "column")
        self.dense = parallel_linear(config, config.hidden_size, config.hidden_size, "row")

    def forward(self, hidden_states: Tensor, bias: Tensor, cos: Tensor, sin: Tensor,
                cache: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        batch, length = hidden_states.shape[0], hidden_states.shape[1]
        mixed = self.query_key_value(hidden_states).reshape([batch, length, self.num_heads, 3 * self.head_dim])
        query, key, value = paddle.split(mixed, 3, axis=-1)  # (B, q, nh, hd) each
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        # THUDM, not PaddleNLP: masked scores filled (not biased) before the coefficient multiplies them back.
        context, cache = attend_cached(query, key, value, cache, bias, None, self.use_flash_attention,
                                       coeff=self.coeff, fill=MASK_FILL)  # keys rotated, (B, q, nh, hd)
        return self.dense(context.reshape([batch, length, self.num_heads * self.head_dim])), cache


class ChatGLMMLP(nn.Layer):
    """h -> inner -> gelu(tanh) -> h."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        inner = config.inner_hidden_size or 4 * config.hidden_size
        self.dense_h_to_4h = parallel_linear(config, config.hidden_size, inner, "column")
        self.dense_4h_to_h = parallel_linear(config, inner, config.hidden_size, "row")
        # Exported graphs spell THUDM's `gelu_impl` out in elementary ops: paddle2onnx turns the fused
        # `gelu(approximate=True)` into exact (erf) GELU.
        self.gelu_as_formula = False

    def forward(self, hidden_states: Tensor) -> Tensor:
        hidden_states = self.dense_h_to_4h(hidden_states)
        if self.gelu_as_formula:
            inner = 0.7978845608028654 * hidden_states * (1.0 + 0.044715 * hidden_states * hidden_states)
            hidden_states = 0.5 * hidden_states * (1.0 + paddle.tanh(inner))
        else:
            hidden_states = F.gelu(hidden_states, approximate=True)
        return self.dense_4h_to_h(hidden_states)


class ChatGLMBlock(nn.Layer):
    """GLM-130B's layer: the residuals are taken from the *normalised* input, scaled by sqrt(2 * layers)."""

    def __init__(self, config: ChatGLMConfig, layer_id: int):
        super().__init__()
        self.alpha = math.sqrt(2.0 * config.num_hidden_layers)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, epsilon=config.layernorm_epsilon)
        self.attention = ChatGLMAttention(config, layer_id)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, epsilon=config.layernorm_epsilon)
        self.mlp = ChatGLMMLP(config)

    def forward(self, hidden_states: Tensor, bias: Tensor, cos: Tensor, sin: Tensor,
                cache: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        attention_input = self.input_layernorm(hidden_states)
        attention_output, new_cache = self.attention(attention_input, bias, cos, sin, cache)
        mlp_input = self.post_attention_layernorm(attention_input * self.alpha + attention_output)
        return mlp_input * self.alpha + self.mlp(mlp_input), new_cache


class ChatGLMStack(nn.Layer):
    """Word embeddings, the layers (sharing one rotary table per forward) and the final LayerNorm."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.enable_recompute = False  # switched on by the Trainer's --recompute
        attr = paddle.ParamAttr(initializer=nn.initializer.XavierNormal())
        if tensor_parallel_degree(config) > 1:
            self.word_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size, weight_attr=attr)
        else:
            self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, weight_attr=attr)
        # Not in the state dict (neither THUDM's loader nor PaddleNLP's reads it from a checkpoint).
        self.register_buffer("inv_freq", rotary_inverse_frequencies(config.hidden_size // config.num_attention_heads),
                             persistable=False)
        self.layers = nn.LayerList([ChatGLMBlock(config, i) for i in range(config.num_hidden_layers)])
        self.final_layernorm = nn.LayerNorm(config.hidden_size, epsilon=config.layernorm_epsilon)

    def forward(
        self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor, cache: Optional[KVCache] = None
    ) -> Tuple[Tensor, KVCache]:
        cache_length = cache[0][0].shape[1] if cache else 0
        bias = mask_bias(attention_mask, input_ids.shape[1], cache_length)  # (B, 1, q, cache + q)
        cos, sin = rotary_tables(position_ids, self.inv_freq, self.word_embeddings.weight.dtype)  # (B, q, 1, hd)
        hidden_states = self.word_embeddings(input_ids)
        new_cache: KVCache = []
        for index, layer in enumerate(self.layers):
            if self.enable_recompute and self.training and not hidden_states.stop_gradient:
                # Keep no K/V here: holding them would keep alive what recompute frees.
                hidden_states, kv = recompute(_hidden_only, layer, hidden_states, bias, cos, sin), None
            else:
                hidden_states, kv = layer(hidden_states, bias, cos, sin, cache[index] if cache else None)
            new_cache.append(kv)
        return self.final_layernorm(hidden_states), new_cache


def _hidden_only(layer: ChatGLMBlock, hidden_states: Tensor, bias: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return layer(hidden_states, bias, cos, sin)[0]


class ChatGLMPretrainedModel(StrictLoading, PretrainedModel):
    """Loading, saving, initialisation and tensor-parallel splits as PaddleNLP's ChatGLM (same files and names)."""

    base_model_prefix = "chatglm"
    config_class = ChatGLMConfig
    resource_files_names = {"model_state": "model_state.pdparams"}
    pretrained_resource_files_map = CHATGLM_PRETRAINED_RESOURCE_FILES_MAP
    # Copies of tensors that this model derives (rotary frequencies) or ties (the output projection), as
    # THUDM's release and conversions of it may carry them.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq", r"rotary_embeddings\.inv_freq",
                                          r"^lm_head\.weight", r"^lm_head\.decoder_weight"]
    # Same split rules as PaddleNLP's ChatGLM (QKV split in whole heads, word embeddings by vocabulary rows): reuse.
    _get_tensor_parallel_mappings = _PaddleNLPChatGLMPretrainedModel._get_tensor_parallel_mappings

    @classmethod
    def _get_name_mappings(cls, config: ChatGLMConfig):
        """THUDM's (Hugging Face) names -> ours; torch's [out, in] linear weights are transposed.
        (PaddleNLP 2.8.1 defines none for ChatGLM.)"""
        names = ["transformer.word_embeddings.weight", "transformer.final_layernorm.weight",
                 "transformer.final_layernorm.bias"]
        for i in range(config.num_hidden_layers):
            for name in ("input_layernorm", "post_attention_layernorm"):
                names += [f"transformer.layers.{i}.{name}.weight", f"transformer.layers.{i}.{name}.bias"]
            for name in ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"):
                names += [(f"transformer.layers.{i}.{name}.weight", "transpose"), f"transformer.layers.{i}.{name}.bias"]
        prefix = "" if cls is ChatGLMModel else cls.base_model_prefix + "."
        mappings = []
        for entry in names:
            source, action = entry if isinstance(entry, tuple) else (entry, None)
            mappings.append(StateDictNameMapping(source, prefix + source, action))
        return mappings

    def _init_weights(self, layer: nn.Layer) -> None:
        """Normal(0, initializer_range or 0.02) weights, zero biases: THUDM's code never initialises (it loads), and
        ChatGLMConfig has no initializer_range of its own."""
        if isinstance(layer, (nn.Linear, nn.Embedding)):
            normal_(layer.weight, mean=0.0, std=getattr(self.config, "initializer_range", 0.02))
        if isinstance(layer, nn.Linear) and layer.bias is not None:
            zeros_(layer.bias)
        elif isinstance(layer, nn.LayerNorm):
            ones_(layer.weight)
            zeros_(layer.bias)


@register_base_model
class ChatGLMModel(ChatGLMPretrainedModel):
    """The transformer; returns final hidden states and the K/V cache."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        _check_supported(config)
        self.transformer = ChatGLMStack(config)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.word_embeddings = value

    def forward(
        self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor, cache: Optional[KVCache] = None
    ) -> Tuple[Tensor, KVCache]:
        return self.transformer(input_ids, position_ids, attention_mask, cache)


class ChatGLMForCausalLM(ChatGLMPretrainedModel):
    """ChatGLM-6B with its output projection tied to the word embeddings."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.chatglm = ChatGLMModel(config)
        self.projection_rows_first = False  # set for an export's Paddle graph (`layers.lm_head`)

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

        `position_ids` [B, 2, S] (default: positions from the cache length on, block positions 0);
        `attention_mask`: 1-D sep [B] or dense [B, 1, S, cache + S] (default: fully bidirectional).
        `labels` [B, S] are the targets *at* each position (not shifted here); `loss_mask` [B, S] selects those
        that count (mean over the selected). `loss_positions_only` (training): project to the vocabulary only where
        `loss_mask` is set; logits then come back for those rows only, [N, V].
        """
        batch, length = input_ids.shape
        cache_length = cache[0][0].shape[1] if cache else 0
        if position_ids is None:
            position_ids = default_position_ids(batch, length, cache_length)
        if attention_mask is None:
            attention_mask = paddle.full([batch], cache_length + length, dtype="int64")
        hidden_states, new_cache = self.chatglm(input_ids, position_ids, attention_mask, cache)
        hidden_states = projected(hidden_states, num_logits_to_keep, logit_index)
        if loss_positions_only and labels is not None and loss_mask is not None:
            hidden_states, labels, loss_mask = loss_positions(hidden_states, labels, loss_mask)
        if label_smoothing is None:
            label_smoothing = float(getattr(self.config, "label_smoothing", 0.0))
        embeddings = self.chatglm.transformer.word_embeddings  # the output projection is tied to them
        logits, loss = lm_head(self, hidden_states, embeddings.weight, labels, loss_mask, label_smoothing,
                               vocab_start=getattr(embeddings, "start", 0), rows_first=self.projection_rows_first)
        if not use_cache:
            new_cache = None
        if not return_dict:
            outputs = (logits, new_cache)
            return ((loss,) + outputs) if loss is not None else outputs
        return CausalLMOutputWithCrossAttentions(loss=loss, logits=logits, past_key_values=new_cache)


# ------------------------------------------------------------------------------------------------------------------
# The ChatGLM-6B family: tokenizer, THUDM's chat template, registry entry
# ------------------------------------------------------------------------------------------------------------------


class ChatGLMTokenizer(_PaddleNLPChatGLMTokenizer):
    """PaddleNLP 2.8.1's tokenizer for `ice_text.model` (same files, same ids), decoding as THUDM's does.

    A token id is its sentencepiece id + `num_image_tokens`: icetk's 20,000 image tokens came first (the first
    release's vocabulary of 150,528); the 130k release dropped them from the embeddings and sets 0. PaddleNLP's
    `_decode` subtracts that offset and then converts the ids with `_convert_id_to_token`, which subtracts it
    again, so with an offset every text token decodes as another one. THUDM, not PaddleNLP: image and pad ids are
    dropped, the others converted as they are.
    """

    def _decode(self, token_ids: List[int], skip_special_tokens: bool = False,
                clean_up_tokenization_spaces: bool = True, spaces_between_special_tokens: bool = True, **kwargs) -> str:
        text_ids = [int(i) for i in token_ids if int(i) >= self.num_image_tokens and int(i) != self.pad_token_id]
        return PretrainedTokenizer._decode(self, text_ids, skip_special_tokens, clean_up_tokenization_spaces,
                                           spaces_between_special_tokens, **kwargs)


def load_chatglm_tokenizer(name_or_path: str) -> ChatGLMTokenizer:
    """ChatGLM-6B's tokenizer from a checkpoint directory or a PaddleNLP model name, its special pieces checked."""
    return _checked(ChatGLMTokenizer.from_pretrained(name_or_path))


def _checked(tokenizer: ChatGLMTokenizer) -> ChatGLMTokenizer:
    """Each piece the template needs must be one of the sentencepiece model's, at its id + the offset: PaddleNLP
    gives a missing special token a new id past the vocabulary (one that no checkpoint trained), and a missing
    "<n>" reads as <unk>."""
    sp = tokenizer.sp_tokenizer
    pieces = [tokenizer.mask_token, tokenizer.gmask_token, tokenizer.bos_token, tokenizer.eos_token,
              tokenizer.pad_token, "<n>"]  # "<n>" stands for every new line of the chat template
    missing = [piece for piece in pieces if sp.PieceToId(piece) == sp.unk_id()
               or tokenizer.convert_tokens_to_ids(piece) != sp.PieceToId(piece) + tokenizer.num_image_tokens]
    if missing:
        raise ValueError(f"{tokenizer.vocab_file} is not ChatGLM-6B's ice_text.model: it has no piece "
                         f"{', '.join(missing)}")
    return tokenizer


FULL_WIDTH = ((",", "，"), ("!", "！"), (":", "："), (";", "；"), ("?", "？"))  # THUDM's process_response


class ChatGLMTemplate(Template):
    r"""THUDM's `chat()` format for ChatGLM-6B, and its tokenizer's special tokens, positions and masks:

        prompt:   text... [gMASK]              (bidirectional)      text = the query, or with a history
        answer:   <sop> target...              (causal)             "[Round 0]\n问：q0\n答：a0\n...[Round n]\n问：query\n答："
        labels:         target... <eop>

    THUDM's tokenizer appends `[gMASK] <sop>` to a text; here the prompt ends with `[gMASK]` and `<sop>` opens the
    answer (`answer_start`), so the prefix before `<sop>` is bidirectional (sep = the index of `<sop>`). Positions
    are 2-D: row 0 counts 0, 1, ... over the prompt and stays at the mask's position ([MASK] if the text holds one,
    else [gMASK], as THUDM) from `<sop>` on; row 1 is 0 over the prompt and counts 1, 2, ... from `<sop>` on.
    """

    position_step = (0, 1)

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        convert = tokenizer.convert_tokens_to_ids
        self.mask, self.gmask = convert(tokenizer.mask_token), convert(tokenizer.gmask_token)
        self.sop, self.eop = convert(tokenizer.bos_token), convert(tokenizer.eos_token)

    @property
    def stop_ids(self) -> Tuple[int, ...]:
        return (self.eop,)

    @property
    def answer_start(self) -> Tuple[int, ...]:
        return (self.sop,)

    @staticmethod
    def text(query: str, history: History) -> str:
        """The prompt text of THUDM's `ChatGLMForConditionalGeneration.chat` (rounds counted from 0)."""
        if not history:
            return query
        rounds = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(history))
        return f"{rounds}[Round {len(history)}]\n问：{query}\n答："

    def render(self, query: str, history: History) -> List[int]:
        return self.render_cut(self.encode(self.text(query, history)), None)

    def response(self, ids: Sequence[int]) -> str:
        """THUDM's `process_response`, which `chat()` applies: ice_text's NFKC normalisation writes full-width
        punctuation in ASCII ("，" -> ","), and beside a Chinese character it is written full-width again."""
        text = self.decode(ids).strip().replace("[[训练时间]]", "2023年")
        for ascii_mark, full_width in FULL_WIDTH:
            text = re.sub(rf"([\u4e00-\u9fff]){re.escape(ascii_mark)}", rf"\1{full_width}", text)
            text = re.sub(rf"{re.escape(ascii_mark)}([\u4e00-\u9fff])", rf"{full_width}\1", text)
        return text

    def render_cut(self, query_ids: List[int], room: Optional[int]) -> List[int]:
        """Ids are cut directly, as THUDM's fine-tuning script cuts them: `ids[:room] [gMASK]`."""
        return list(query_ids[:room]) + [self.gmask]

    def sep(self, prompt_ids: Sequence[int]) -> int:
        return len(prompt_ids)  # the index of <sop>

    def positions(self, prompt_ids: Sequence[int], length: int) -> np.ndarray:
        sep = len(prompt_ids)
        anchor = self.mask if self.mask in prompt_ids else self.gmask
        if anchor not in prompt_ids:
            raise ValueError("the prompt has no [MASK] or [gMASK] token: build it with the template")
        mask = list(prompt_ids).index(anchor)
        return np.array([list(range(sep)) + [mask] * (length - sep), [0] * sep + list(range(1, length - sep + 1))],
                        dtype="int64")

    def special_ids(self) -> Dict[str, object]:
        return {**super().special_ids(), "mask": self.mask, "gmask": self.gmask, "sop": self.sop, "eop": self.eop}


class ChatGLMFamily(Family):
    """THUDM's ChatGLM-6B (chatglm-6b, chatglm-6b-v1.1): 2-D rotary positions, [gMASK] <sop> prompts."""

    name = "chatglm"
    model_types = ("chatglm",)
    name_patterns = ("chatglm",)  # chatglm2/chatglm3 names: the ChatGLM2 family's longer patterns win
    tokenizer_classes = ("ChatGLMTokenizer",)
    # PaddleNLP's LLM recipe's default for ChatGLM-6B: every linear layer (QKV, attention output, both MLP ones).
    lora_targets = (".*query_key_value.*", ".*dense.*")
    position_rows = 2
    # THUDM's Hugging Face configs of ChatGLM2/3 say model_type "chatglm" too; only they carry these keys
    # (ChatGLM-6B's carry position_encoding_2d and inner_hidden_size).
    CHATGLM2_KEYS = ("multi_query_attention", "kv_channels", "padded_vocab_size", "rmsnorm")

    @property
    def model_class(self):
        return ChatGLMForCausalLM

    def claims(self, config: dict) -> bool:
        return super().claims(config) and not any(key in config for key in self.CHATGLM2_KEYS)

    def load_tokenizer(self, name_or_path: str) -> ChatGLMTokenizer:
        return load_chatglm_tokenizer(name_or_path)

    def template(self, tokenizer) -> ChatGLMTemplate:
        return ChatGLMTemplate(tokenizer)

    def tensor_parallel_problems(self, config, degree: int) -> List[str]:
        inner = config.inner_hidden_size or 4 * config.hidden_size
        problems = super().tensor_parallel_problems(config, degree)
        if inner % degree:
            problems.append(f"--tensor_parallel_degree {degree} does not divide the model's MLP width {inner}")
        return problems

    @property
    def release(self) -> "ChatGLMRelease":
        return ChatGLMRelease()

    def paddle_graph_form(self, model):
        return rows_first_projection(model)  # the output projection tied to the embeddings

    def prepare_export(self, model) -> None:
        for layer in model.sublayers():
            if isinstance(layer, ChatGLMMLP):
                layer.gelu_as_formula = True  # survives paddle2onnx exactly (see ChatGLMMLP)


# ------------------------------------------------------------------------------------------------------------------
# ChatGLM-6B's published checkpoints (paddle_glm.convert)
# ------------------------------------------------------------------------------------------------------------------

class ChatGLMRelease(Release):
    """THUDM/chatglm-6b (and -v1.1): 8 fp16 `.bin` shards with an index, `ice_text.model`."""

    model_class = ChatGLMForCausalLM
    tokenizer_file = "ice_text.model"
    hf_tokenizer = THUDM_CHATGLM_TOKENIZER
    hf_constants = {"model_type": "chatglm", "architectures": ["ChatGLMModel"], "auto_map": THUDM_CHATGLM_MODEL_CODE}
    hf_fields = (  # THUDM's ChatGLMConfig (chatglm-6b's configuration_chatglm.py)
        "vocab_size", "hidden_size", "num_layers", "num_attention_heads", "layernorm_epsilon", "use_cache",
        "bos_token_id", "eos_token_id", "mask_token_id", "gmask_token_id", "pad_token_id", "max_sequence_length",
        "inner_hidden_size", "position_encoding_2d", "quantization_bit", "pre_seq_len", "prefix_projection",
    )

    def derived(self, config, dtype: str) -> Derived:
        """Each layer's rotary inverse frequencies (a buffer THUDM's checkpoints keep, computed in half precision,
        which our model computes the same way) and `lm_head.weight`, tied to the word embeddings (THUDM's loader
        ties it on load, whatever the file holds)."""
        frequencies = rotary_inverse_frequencies(config.hidden_size // config.num_attention_heads).numpy().astype(dtype)
        names = [f"transformer.layers.{i}.attention.rotary_emb.inv_freq" for i in range(config.num_hidden_layers)]
        return {**dict.fromkeys(names, frequencies), "lm_head.weight": "transformer.word_embeddings.weight"}


FAMILY = ChatGLMFamily()
