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
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle import Tensor
from paddle.distributed.fleet.utils import recompute
from paddlenlp.transformers import (
    AutoTokenizer, GLMChineseTokenizer, PretrainedModel, PretrainedTokenizer, register_base_model,
)
from paddlenlp.transformers.glm.configuration import (
    GLM_PRETRAINED_INIT_CONFIGURATION,
    GLM_PRETRAINED_RESOURCE_FILES_MAP,
    GLMConfig,
)
from paddlenlp.transformers.glm.modeling import GLMPretrainedModel as _PaddleNLPGLMPretrainedModel
from paddlenlp.transformers.model_outputs import CausalLMOutputWithCrossAttentions

from ..dropout import Dropout
from ..parallel import VocabParallelEmbedding, tensor_parallel_degree
from .family import Family, History, Template
from .layers import (
    KVCache, StrictLoading, attend_cached, default_position_ids, lm_head, loss_positions, mask_bias, parallel_linear,
    projected, rows_first_projection,
)
from .release import COLS, QKV, ROWS, SAME, Release, TensorSpec

__all__ = [
    "GLMConfig", "GLMModel", "GLMPretrainedModel", "GLMForConditionalGeneration", "GLMSpecialIds", "GLMTemplate",
    "GLMFamily", "FAMILY", "load_glm_tokenizer", "tokenizer_from_sentencepiece", "padded_training_example",
]


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
        # A tensor-parallel shard of QKV is laid out per head, [q_h | k_h | v_h] for each of its heads
        # (PaddleNLP's split rule); the whole matrix is [q | k | v].
        self.per_head_qkv = degree > 1
        self.query_key_value = parallel_linear(config, config.hidden_size, 3 * config.hidden_size, "column")
        self.dense = parallel_linear(config, config.hidden_size, config.hidden_size, "row")
        self.attention_dropout = Dropout(config.attention_dropout_prob)
        self.output_dropout = Dropout(config.output_dropout_prob)

    def forward(
        self, hidden_states: Tensor, bias: Tensor, cache: Optional[Tuple[Tensor, Tensor]] = None
    ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        batch, length = hidden_states.shape[0], hidden_states.shape[1]
        mixed = self.query_key_value(hidden_states)  # (B, q, 3 * nh * hd)
        shape = [batch, length, self.num_heads, self.head_dim]
        if self.per_head_qkv:
            query, key, value = paddle.split(mixed.reshape([batch, length, self.num_heads, 3 * self.head_dim]), 3, axis=-1)
        else:
            query, key, value = (part.reshape(shape) for part in paddle.split(mixed, 3, axis=-1))  # (B, q, nh, hd)
        context, cache = attend_cached(query, key, value, cache, bias, self.attention_dropout,
                                       self.use_flash_attention)  # (B, q, nh, hd)
        output = self.dense(context.reshape([batch, length, self.num_heads * self.head_dim]))
        return self.output_dropout(output), cache


class GLMMLP(nn.Layer):
    """h -> 4h -> gelu(tanh) -> h, as GLM's GPT-2 style MLP."""

    def __init__(self, config: GLMConfig):
        super().__init__()
        self.dense_h_to_4h = parallel_linear(config, config.hidden_size, 4 * config.hidden_size, "column")
        self.dense_4h_to_h = parallel_linear(config, 4 * config.hidden_size, config.hidden_size, "row")
        self.dropout = Dropout(config.output_dropout_prob)
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
        self, hidden_states: Tensor, bias: Tensor, cache: Optional[Tuple[Tensor, Tensor]] = None
    ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        attention_output, new_cache = self.attention(self.input_layernorm(hidden_states), bias, cache)
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
        self.embedding_dropout = Dropout(config.embedding_dropout_prob)
        self.layers = nn.LayerList([GLMBlock(config) for _ in range(config.num_layers)])
        self.final_layernorm = nn.LayerNorm(config.hidden_size, epsilon=config.layernorm_epsilon)

    def forward(
        self, hidden_states: Tensor, position_ids: Tensor, attention_mask: Tensor, cache: Optional[KVCache] = None
    ) -> Tuple[Tensor, KVCache]:
        cache_length = cache[0][0].shape[1] if cache else 0
        bias = mask_bias(attention_mask, hidden_states.shape[1], cache_length)  # (B, 1, q, cache + q)

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
                hidden_states, kv = recompute(_hidden_only, layer, hidden_states, bias), None
            else:
                hidden_states, kv = layer(hidden_states, bias, layer_cache)
            new_cache.append(kv)
        return self.final_layernorm(hidden_states), new_cache


def _hidden_only(layer: GLMBlock, hidden_states: Tensor, bias: Tensor) -> Tensor:
    return layer(hidden_states, bias)[0]


class GLMPretrainedModel(StrictLoading, PretrainedModel):
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
            position_ids = default_position_ids(batch, length, cache_length)
        if attention_mask is None:
            attention_mask = paddle.full([batch], cache_length + length, dtype="int64")
        hidden_states, new_cache = self.glm(input_ids, position_ids, attention_mask, cache)
        hidden_states = projected(hidden_states, num_logits_to_keep, logit_index)
        if loss_positions_only and labels is not None and loss_mask is not None:
            hidden_states, labels, loss_mask = loss_positions(hidden_states, labels, loss_mask)
        if label_smoothing is None:
            label_smoothing = float(getattr(self.config, "label_smoothing", 0.0))
        embeddings = self.glm.word_embeddings  # the output projection is tied to them
        logits, loss = lm_head(self, hidden_states, embeddings.weight, labels, loss_mask, label_smoothing,
                               vocab_start=getattr(embeddings, "start", 0), rows_first=self.projection_rows_first)
        if not use_cache:
            new_cache = None
        if not return_dict:
            outputs = (logits, new_cache)
            return ((loss,) + outputs) if loss is not None else outputs
        return CausalLMOutputWithCrossAttentions(loss=loss, logits=logits, past_key_values=new_cache)


# ------------------------------------------------------------------------------------------------------------------
# The GLM family: tokenizer, blank-infilling template, registry entry
# ------------------------------------------------------------------------------------------------------------------

# The special tokens GLM's blank infilling needs, by tokenizer attribute.
SPECIAL_TOKEN_ATTRIBUTES = (
    "pad_token_id", "eos_token_id", "cls_token_id", "sop_token_id", "eop_token_id", "gmask_token_id", "smask_token_id",
)


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


def load_glm_tokenizer(name_or_path: str) -> PretrainedTokenizer:
    """A GLM tokenizer from a model name, a checkpoint directory, or a sentencepiece `.model` file.

    `GLMChineseTokenizer` built straight from a sentencepiece file maps every special token (`[gMASK]`,
    `<|startofpiece|>`, ...) to id 0 until `sanitize_special_tokens()` runs; training on such ids silently teaches
    the model nothing about the blank. Every tokenizer handed out is checked.
    """
    if os.path.isfile(name_or_path) and name_or_path.endswith(".model"):
        return tokenizer_from_sentencepiece(name_or_path)
    return _checked(AutoTokenizer.from_pretrained(name_or_path))


def tokenizer_from_sentencepiece(model_file: str) -> GLMChineseTokenizer:
    """A `GLMChineseTokenizer` over a sentencepiece model (e.g. `cog-pretrain.model`)."""
    if not os.path.isfile(model_file):
        raise FileNotFoundError(f"sentencepiece model not found: {model_file}")
    return _checked(GLMChineseTokenizer(model_file=model_file))


def _checked(tokenizer: PretrainedTokenizer) -> PretrainedTokenizer:
    tokenizer.sanitize_special_tokens()
    ids = {name: getattr(tokenizer, name, None) for name in SPECIAL_TOKEN_ATTRIBUTES}
    missing = [name for name, value in ids.items() if value is None]
    if missing:
        raise ValueError(f"{type(tokenizer).__name__} is not a GLM tokenizer: it has no {', '.join(missing)}")
    distinct = {name: value for name, value in ids.items() if name != "eos_token_id"}  # GLM: eos == pad
    if len(set(distinct.values())) != len(distinct):
        raise ValueError(f"GLM special tokens share ids, the tokenizer files are broken: {ids}")
    return tokenizer


class GLMTemplate(Template):
    """GLM's generation format (THUDM's GLM and PaddleNLP's example):

        part A (bidirectional):  [CLS] source... [gMASK] <|endoftext|>
        part B (causal):         <|startofpiece|> target...        labels: target... <|endofpiece|>

    Position ids are 2-D: row 0 counts 0, 1, ... over part A and stays at the mask's position over part B; row 1
    is 0 over part A and counts 1, 2, ... over part B. A dialogue's history is rendered as `Human: ...` /
    `Assistant: ...` lines (BELLE's own convention), ending with an open `Assistant:`.
    """

    position_step = (0, 1)

    def __init__(self, tokenizer, special: Optional[GLMSpecialIds] = None):
        super().__init__(tokenizer)
        self.special = special or GLMSpecialIds.from_tokenizer(tokenizer)

    @property
    def stop_ids(self) -> Tuple[int, ...]:
        return (self.special.eop,)

    @property
    def pad_id(self) -> int:
        return self.special.pad

    @property
    def answer_start(self) -> Tuple[int, ...]:
        return (self.special.sop,)

    def render(self, query: str, history: History) -> List[int]:
        if history:
            rounds = "".join(f"Human: {q}\nAssistant: {a}\n" for q, a in history)
            query = f"{rounds}Human: {query}\nAssistant:"
        return self.render_cut(self.encode(query), None)

    def render_cut(self, query_ids: List[int], room: Optional[int]) -> List[int]:
        """GLM cuts ids directly: `[CLS] ids[:room] [gMASK] <|endoftext|>`."""
        return [self.special.cls] + list(query_ids[:room]) + [self.special.gmask, self.special.eos]

    def sep(self, prompt_ids: Sequence[int]) -> int:
        return len(prompt_ids)

    def positions(self, prompt_ids: Sequence[int], length: int) -> np.ndarray:
        sep = len(prompt_ids)
        mask = next((i for i, token in enumerate(prompt_ids) if token in self.special.mask_ids), None)
        if mask is None:
            raise ValueError("the source has no [MASK], [sMASK] or [gMASK] token: build it with the template")
        return np.array([list(range(sep)) + [mask] * (length - sep), [0] * sep + list(range(1, length - sep + 1))],
                        dtype="int64")

    def special_ids(self) -> Dict[str, object]:
        return {**super().special_ids(), "cls": self.special.cls, "eos": self.special.eos, "sop": self.special.sop,
                "eop": self.special.eop, "gmask": self.special.gmask}


def padded_training_example(template: GLMTemplate, prompt_ids: Sequence[int], target_ids: Sequence[int],
                            src_length: int, tgt_length: int) -> Dict[str, np.ndarray]:
    """The same example in PaddleNLP's reference layout, to compare against (tests, `bench/`).

    The reference example pads part A to `src_length` and part B to `tgt_length`, passes a dense [1, S, S] 0/1
    attention mask (as its tokenizer's `build_inputs_for_generation` makes it) and a float `loss_mask` over all S
    positions; its model projects every position to the vocabulary.
    """
    special = template.special
    target = list(target_ids)[: tgt_length - 1]
    sep = len(prompt_ids)
    if sep > src_length:
        raise ValueError(f"the source has {sep} ids, more than src_length {src_length}")
    length = src_length + tgt_length
    part_b = [special.sop] + target + [special.eop] + [special.pad] * (tgt_length - len(target) - 1)  # tgt + 1
    mask = np.zeros([length, length], dtype="int64")
    mask[:, :sep] = 1  # part A, without its pads, is visible to every query
    mask[src_length:, src_length:] = np.tril(np.ones([tgt_length, tgt_length], dtype="int64"))
    mask_pos = int(template.positions(prompt_ids, sep + 1)[0, -1])
    return {
        "input_ids": np.array(list(prompt_ids) + [special.pad] * (src_length - sep) + part_b[:-1], dtype="int64"),
        "position_ids": np.array(
            [list(range(src_length)) + [mask_pos] * tgt_length, [0] * src_length + list(range(1, tgt_length + 1))],
            dtype="int64",
        ),
        "attention_mask": mask[None],
        "labels": np.array([0] * src_length + part_b[1:], dtype="int64"),
        "loss_mask": np.array([0] * src_length + [1] * (len(target) + 1) + [0] * (tgt_length - len(target) - 1),
                              dtype="float32"),
    }


class GLMFamily(Family):
    """THUDM's GLM (glm-large-chinese, glm-10b-chinese): blank infilling, 2-D positions, learned embeddings."""

    name = "glm"
    model_types = ("glm",)
    name_patterns = ("glm",)
    tokenizer_classes = ("GLMChineseTokenizer", "GLMGPT2Tokenizer", "GLMBertTokenizer")
    position_rows = 2
    pretraining_objective = "blank_infilling"

    @property
    def model_class(self):
        return GLMForConditionalGeneration

    def load_tokenizer(self, name_or_path: str):
        return load_glm_tokenizer(name_or_path)

    def template(self, tokenizer) -> GLMTemplate:
        return GLMTemplate(tokenizer)

    @property
    def release(self) -> "GLMRelease":
        return GLMRelease()

    def paddle_graph_form(self, model):
        return rows_first_projection(model)  # the output projection tied to the embeddings

    def prepare_export(self, model) -> None:
        for layer in model.sublayers():
            if isinstance(layer, GLMMLP):
                layer.gelu_as_formula = True  # survives paddle2onnx exactly (see GLMMLP)


# ------------------------------------------------------------------------------------------------------------------
# GLM's published checkpoints (paddle_glm.convert)
# ------------------------------------------------------------------------------------------------------------------

# GLMModel's tensors by THUDM's name (ours and HF's add `glm.`): (model-parallel split, torch shape with
# h = hidden, v = vocabulary, p = position rows, and whether torch stores it [out, in] where Paddle has [in, out]).
GLM_TENSORS: Dict[str, Tuple[str, Tuple[str, ...], bool]] = {
    "word_embeddings.weight": (ROWS, ("v", "h"), False),
    "transformer.position_embeddings.weight": (SAME, ("p", "h"), False),
    "transformer.block_position_embeddings.weight": (SAME, ("p", "h"), False),
    "transformer.layers.{i}.input_layernorm.weight": (SAME, ("h",), False),
    "transformer.layers.{i}.input_layernorm.bias": (SAME, ("h",), False),
    "transformer.layers.{i}.attention.query_key_value.weight": (QKV, ("3h", "h"), True),
    "transformer.layers.{i}.attention.query_key_value.bias": (QKV, ("3h",), False),
    "transformer.layers.{i}.attention.dense.weight": (COLS, ("h", "h"), True),
    "transformer.layers.{i}.attention.dense.bias": (SAME, ("h",), False),
    "transformer.layers.{i}.post_attention_layernorm.weight": (SAME, ("h",), False),
    "transformer.layers.{i}.post_attention_layernorm.bias": (SAME, ("h",), False),
    "transformer.layers.{i}.mlp.dense_h_to_4h.weight": (ROWS, ("4h", "h"), True),
    "transformer.layers.{i}.mlp.dense_h_to_4h.bias": (ROWS, ("4h",), False),
    "transformer.layers.{i}.mlp.dense_4h_to_h.weight": (COLS, ("h", "4h"), True),
    "transformer.layers.{i}.mlp.dense_4h_to_h.bias": (SAME, ("h",), False),
    "transformer.final_layernorm.weight": (SAME, ("h",), False),
    "transformer.final_layernorm.bias": (SAME, ("h",), False),
}
GLM_PREFIX = "glm."  # ours and the HF release keep GLMModel under GLMForConditionalGeneration.glm
PRESETS = {name.split("/")[-1]: values for name, values in GLM_PRETRAINED_INIT_CONFIGURATION.items()}
SHAPE_FLAGS = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_sequence_length")

# Fields of the HF release's GLMConfig (its configuration_glm.py) that PaddleNLP's GLMConfig shares.
GLM_HF_FIELDS = (
    "num_layers", "vocab_size", "hidden_size", "num_attention_heads", "embedding_dropout_prob",
    "attention_dropout_prob", "output_dropout_prob", "max_sequence_length", "checkpoint_num_layers",
    "parallel_output", "relative_encoding", "block_position_encoding", "output_predict", "spell_length",
    "spell_func", "attention_scale", "initializer_range", "pool_token",
)

# THUDM's own conversion of glm-10b-chinese into its Hugging Face release copies word embedding rows (source,
# destination) to match the released tokenizer's ids (scripts/convert_glm_checkpoint_to_transformers.py); the
# same preset of a THUDM checkpoint gets the same copy, so that it equals the release.
THUDM_EMBEDDING_COPIES = {"glm-10b-chinese": [(50007, 50009)]}


def glm_tensor_specs(config: GLMConfig) -> List[TensorSpec]:
    """Every tensor of a GLM with this config, in model order, with its whole shape."""
    h = config.hidden_size
    positions = config.max_sequence_length + (1 if config.block_position_encoding else 0)
    sizes = {"h": h, "3h": 3 * h, "4h": 4 * h, "v": config.vocab_size, "p": positions}
    specs = []
    for pattern, (split, dims, transposed) in GLM_TENSORS.items():
        if "block_position" in pattern and not config.block_position_encoding:
            continue
        torch_shape = tuple(sizes[d] for d in dims)
        shape = torch_shape[::-1] if transposed else torch_shape
        layers = range(config.num_layers) if "{i}" in pattern else [0]
        specs += [TensorSpec(GLM_PREFIX + pattern.format(i=i), GLM_PREFIX + pattern.format(i=i), shape, transposed,
                             split) for i in layers]
    return specs


class GLMRelease(Release):
    """THUDM's GLM (glm-large-chinese, glm-10b-chinese): the Hugging Face release and THUDM's training checkpoints."""

    model_class = GLMForConditionalGeneration
    tokenizer_file = "cog-pretrain.model"  # GLM's sentencepiece model, as THUDM and PaddleNLP name it
    hf_constants = {
        "architectures": ["GLMForConditionalGeneration"], "model_type": "glm",
        # The release's model classes live in its own code files (trust_remote_code), which we do not ship.
        "auto_map": {
            "AutoConfig": "configuration_glm.GLMConfig",
            "AutoModel": "modeling_glm.GLMModel",
            "AutoModelForSeq2SeqLM": "modeling_glm.GLMForConditionalGeneration",
            "AutoModelForMultipleChoice": "modeling_glm.GLMForMultipleChoice",
        },
        "max_memory_length": 0, "checkpoint_activations": False,
    }
    hf_fields = GLM_HF_FIELDS

    def config_from_hf(self, hf: Dict[str, Any], overrides: Dict[str, Any]) -> GLMConfig:
        values = {key: hf[key] for key in GLM_HF_FIELDS + ("layernorm_epsilon",) if key in hf}
        values.setdefault("num_layers", hf.get("num_hidden_layers"))
        return self.config_from_ours(values, overrides)

    def config_from_ours(self, values: Dict[str, Any], overrides: Dict[str, Any]) -> GLMConfig:
        """PaddleNLP's GLMConfig, refusing what our model does not implement; what the values lack, the flags or
        a preset must give (THUDM training checkpoints carry no config)."""
        bookkeeping = ("architectures", "dtype", "torch_dtype", "tensor_parallel_degree", "tensor_parallel_rank")
        values = {k: v for k, v in {**values, **overrides}.items() if k not in bookkeeping}
        missing = [name for name in SHAPE_FLAGS if values.get(name) is None]
        if missing:
            flags = " ".join(f"--{name}" for name in missing)
            raise ValueError(f"the checkpoint does not tell {', '.join(missing)}: give {flags} or --preset "
                             f"({', '.join(PRESETS)})")
        if values["hidden_size"] % values["num_attention_heads"]:
            raise ValueError(f"hidden_size {values['hidden_size']} is no multiple of num_attention_heads "
                             f"{values['num_attention_heads']}")
        if values.get("relative_encoding") or float(values.get("attention_scale", 1.0)) != 1.0:
            raise ValueError("relative_encoding and attention_scale != 1 are not implemented by our GLM")
        values["output_predict"] = True  # the tied language-model head
        config = GLMConfig(**values)
        config.architectures = [self.model_class.__name__]
        return config

    def specs(self, config: GLMConfig) -> List[TensorSpec]:
        return glm_tensor_specs(config)


FAMILY = GLMFamily()
