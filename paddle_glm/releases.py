"""What each family's published checkpoints look like, next to ours: the knowledge `paddle_glm.convert` needs.

A `Release` describes THUDM's Hugging Face release of one family against our (PaddleNLP's) layout: which tensors
there are (names on both sides, shapes, whether torch stores them transposed), how config.json reads both ways,
and the tokenizer's files. Most of it is read from the family's model class, which already carries PaddleNLP's
conventions, so that a family states little:
- tensor names: the model class's `_get_name_mappings(config)` (release name -> ours, "transpose" for torch's
  [out, in] Linear weights), as PaddleNLP's `from_pretrained(convert_from_torch=True)` uses them;
- shapes, and whether our model supports the config at all: the model built under `paddle.LazyGuard` (no
  memory, the model's own config checks run);
- config names: the config class's `attribute_map` (THUDM's `num_layers`, `padded_vocab_size`, `seq_length`);
- tensor-parallel splits: the model class's own rules (used by convert.py).
What a family states: its release's constant config.json fields (model_type, architectures, auto_map), the
THUDM config fields to write (THUDM's defaults differ from PaddleNLP's, so every one is written), the
sentencepiece file, and tensors the release stores that our model derives (ChatGLM-6B: rotary frequencies, the
tied lm_head). GLM's release predates those conventions (PaddleNLP 2.8.1's GLM name mapping fails to import) and
has THUDM training checkpoints besides: its tensors are a table here.

Releases raise ValueError on configs they cannot take; convert.py names the file.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple, Union

import numpy as np
import paddle
from paddlenlp.transformers.glm.configuration import GLM_PRETRAINED_INIT_CONFIGURATION
from paddlenlp.transformers.model_utils import no_init_weights

from .models.chatglm import ChatGLMForCausalLM, rotary_inverse_frequencies
from .models.chatglm2 import ChatGLMv2ForCausalLM
from .models.glm import GLMConfig, GLMForConditionalGeneration

__all__ = ["Release", "TensorSpec", "RELEASES", "GLM_TENSORS", "PRESETS", "SHAPE_FLAGS", "SAME", "ROWS", "COLS", "QKV",
           "glm_tensor_specs", "merge_model_parallel"]

# Fields of THUDM's config.json that describe the files, not the model.
HF_BOOKKEEPING = ("architectures", "auto_map", "model_type", "torch_dtype", "transformers_version")

# How THUDM's model parallelism splits a tensor (torch layout) over the ranks; change_mp.py merges likewise.
SAME = "same"  # replicated on every rank
ROWS = "rows"  # dim 0: VocabParallelEmbedding; ColumnParallelLinear weight and bias
COLS = "cols"  # dim 1: RowParallelLinear weight (its bias is replicated)
QKV = "qkv"  # ColumnParallelLinear(stride=3): rank r holds [q_r; k_r; v_r], the rows of its own heads


@dataclass(frozen=True)
class TensorSpec:
    name: str  # ours (PaddleNLP's)
    hf_name: str  # in THUDM's Hugging Face release
    shape: Tuple[int, ...]  # ours
    transposed: bool  # torch stores it [out, in], Paddle [in, out]
    mp_split: str = SAME  # how THUDM's model parallelism splits it (GLM training checkpoints only)

    def source_shape(self, torch_layout: bool) -> Tuple[int, ...]:
        return self.shape[::-1] if self.transposed and torch_layout else self.shape


Derived = Dict[str, Union[np.ndarray, str]]  # release name -> its value, or the name of the tensor it equals


class Release:
    """One family's Hugging Face release (THUDM's) against our layout; generic defaults from the model class."""

    model_class: Any = None
    hf_constants: Dict[str, Any] = {}  # config.json fields every release of the family has the same
    hf_fields: Tuple[str, ...] = ()  # THUDM's config fields (THUDM's names), written from ours by --to hf
    tokenizer_file: str = ""  # the sentencepiece model, as both layouts name it
    hf_tokenizer: Dict[str, Any] = {}  # THUDM's tokenizer_config.json fields naming its (remote) tokenizer class

    @property
    def config_class(self):
        return self.model_class.config_class

    # ---------------------------------------------------------------- config.json

    def config_from_hf(self, hf: Dict[str, Any], overrides: Dict[str, Any]):
        """Ours from THUDM's config.json: THUDM's names renamed as the config class's `attribute_map` says."""
        renames = self.config_class.attribute_map
        values = {renames.get(key, key): value for key, value in hf.items() if key not in HF_BOOKKEEPING}
        return self.config_from_ours({**values, **overrides}, {})

    def config_from_ours(self, values: Dict[str, Any], overrides: Dict[str, Any]):
        """Ours from our (PaddleNLP's) config.json (the whole model's, whatever degree it was saved with)."""
        renames = self.config_class.attribute_map  # names given as flags (--num_layers) are THUDM's
        values = {**values, **{renames.get(key, key): value for key, value in overrides.items()}}
        values = {key: value for key, value in values.items() if not key.startswith("tensor_parallel_")}
        values["architectures"] = [self.model_class.__name__]  # PaddleNLP's name mappings read it
        return self.config_class(**values)

    def hf_config(self, config, dtype: str) -> Dict[str, Any]:
        """THUDM's config.json for `config` (attributes answer to THUDM's names through `attribute_map`)."""
        values = {field: getattr(config, field) for field in self.hf_fields if hasattr(config, field)}
        name = getattr(config, "_name_or_path", "")
        return {**({"_name_or_path": name} if name else {}), **self.hf_constants, **values, "torch_dtype": dtype}

    # ---------------------------------------------------------------- tensors

    def specs(self, config) -> List[TensorSpec]:
        """Every tensor of our model for `config`, in model order, with its release name."""
        with paddle.LazyGuard(), no_init_weights():  # shapes only: nothing is allocated
            model = self.model_class(config)
        mappings = {m.target_name: m for m in self.model_class._get_name_mappings(config)}
        specs = []
        for name, tensor in model.state_dict().items():
            mapping = mappings.get(name)
            if mapping is None or mapping.action not in (None, "transpose"):
                raise ValueError(f"{self.model_class.__name__}._get_name_mappings gives {name} no release name or an "
                                 f"action other than a transpose ({mapping})")
            specs.append(TensorSpec(name, mapping.source_name, tuple(tensor.shape), mapping.action == "transpose"))
        return specs

    def derived(self, config, dtype: str) -> Derived:
        """Tensors the release stores that our model derives: read back only to check them, written by --to hf."""
        return {}


# ---------------------------------------------------------------------------------------------------- GLM

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


def merge_model_parallel(parts: Sequence[np.ndarray], split: str) -> np.ndarray:
    """Undo THUDM's model-parallel split of one tensor (torch layout), as change_mp.py does."""
    if split == SAME or len(parts) == 1:
        return parts[0]
    if split == QKV:  # [q_0; k_0; v_0], [q_1; k_1; v_1], ... -> [q_0; q_1; ...; k_0; k_1; ...; v_0; v_1; ...]
        thirds = [np.split(part, 3, axis=0) for part in parts]
        return np.concatenate([third[i] for i in range(3) for third in thirds], axis=0)
    return np.concatenate(parts, axis=1 if split == COLS else 0)


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


# ----------------------------------------------------------------------------------------------- ChatGLM

THUDM_CHATGLM_MODEL_CODE = {
    "AutoConfig": "configuration_chatglm.ChatGLMConfig",
    "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
}
THUDM_CHATGLM_TOKENIZER = {"tokenizer_class": "ChatGLMTokenizer",
                           "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}


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


# By family name (paddle_glm.models.FAMILIES).
RELEASES: Dict[str, Release] = {"glm": GLMRelease(), "chatglm": ChatGLMRelease(), "chatglm2": ChatGLMv2Release()}
