"""What a family's published checkpoints look like, next to ours: the knowledge `paddle_glm.convert` needs.

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

Each family module defines its `Release` subclass (`Family.release`); releases raise ValueError on configs they
cannot take, and convert.py names the file.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple, Union

import numpy as np
import paddle
from paddlenlp.transformers.model_utils import no_init_weights

__all__ = ["Release", "TensorSpec", "Derived", "SAME", "ROWS", "COLS", "QKV", "merge_model_parallel",
           "THUDM_CHATGLM_MODEL_CODE", "THUDM_CHATGLM_TOKENIZER"]

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


def merge_model_parallel(parts: Sequence[np.ndarray], split: str) -> np.ndarray:
    """Undo THUDM's model-parallel split of one tensor (torch layout), as change_mp.py does."""
    if split == SAME or len(parts) == 1:
        return parts[0]
    if split == QKV:  # [q_0; k_0; v_0], [q_1; k_1; v_1], ... -> [q_0; q_1; ...; k_0; k_1; ...; v_0; v_1; ...]
        thirds = [np.split(part, 3, axis=0) for part in parts]
        return np.concatenate([third[i] for i in range(3) for third in thirds], axis=0)
    return np.concatenate(parts, axis=1 if split == COLS else 0)


# THUDM's remote-code class names of the ChatGLM releases (ChatGLM-6B, ChatGLM2/3), written by --to hf.
THUDM_CHATGLM_MODEL_CODE = {
    "AutoConfig": "configuration_chatglm.ChatGLMConfig",
    "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
}
THUDM_CHATGLM_TOKENIZER = {"tokenizer_class": "ChatGLMTokenizer",
                           "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}
