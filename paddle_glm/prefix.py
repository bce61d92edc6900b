"""P-Tuning v2 (prefix tuning) for every family: a learned K/V cache that every prompt starts from.

ChatGLM-6B's own recipe (THUDM's `ptuning/`) trains `pre_seq_len` key/value vectors per layer with the model
frozen. Every family here already takes a K/V cache (`models.layers`: one (key, value) per layer, each
[B, T, kv_heads, head_dim]), so a prefix is nothing but an initial cache, and one wrapper serves GLM, ChatGLM-6B
and ChatGLM2/3 alike:
- the prefix encoder is PaddleNLP's P-Tuning v2 shape: an embedding of pre_seq_len x (2 * layers * kv_heads *
  head_dim), or (`prefix_projection`) an embedding of pre_seq_len x (kv_heads * head_dim) through
  Linear -> tanh -> Linear to that width; dropout on its output. Each row is laid out [2 (key, value), layers,
  kv_heads, head_dim], PaddleNLP's layout;
- the prefix keys are visible to every query: a sep mask moves by pre_seq_len, a dense mask gets pre_seq_len
  columns of ones on the left; the real tokens keep their positions (they are given, never derived from the
  cache length). Callers (training, `generation.DygraphStepper`, `scoring.Scorer`, the exported graphs) pass the
  masks they would pass without a prefix: a call without a cache starts from the prefix, a call with one passes
  back what an earlier call returned, prefix included;
- under tensor parallelism the encoder is whole on every rank (it mixes heads when projected), each rank takes the
  K/V heads its query heads read (`kv_head_slice`: ChatGLM2's groups, replicated when ranks outnumber them), and
  the encoder's gradient is summed over the ranks, so 2 ranks train as 1.

Files are PaddleNLP's `paddlenlp.peft` prefix format (`prefix_config.json` + `prefix_model_state.pdparams` with the
encoder's own keys `0.weight`, ...), with these differences:
- the prefix is always saved whole (`tensor_parallel_degree` -1): PaddleNLP splits the encoder's flat output into N
  contiguous blocks per rank, which are not the heads a rank's attention holds (and for ChatGLM2's K/V groups it
  does not split at all); a whole prefix loads at any degree;
- `head_dim` is recorded: PaddleNLP derives hidden_size / heads, which is not ChatGLM2's kv_channels in general;
- no `pre_caches.npy` (PaddleNLP's static predictor input): our exports hold the prefix in their prefill graph;
- PaddleNLP's GLM has no prefix support (it caches hidden states, not K/V); the same files serve our GLM.
THUDM's checkpoints (`transformer.prefix_encoder.embedding.weight`) lay each row out [layers, 2] instead.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional, Tuple

import numpy as np
import paddle
import paddle.nn as nn
from paddle import Tensor
from paddlenlp.peft import PrefixConfig, PrefixModelForCausalLM
from paddlenlp.transformers.model_utils import dtype_guard
from paddlenlp.utils.env import PREFIX_CONFIG_NAME, PREFIX_WEIGHTS_NAME

from .args import InputError
from .logs import logger
from .models import family_of
from .models.layers import KVCache
from .parallel import copy_to_model_parallel, tensor_parallel_degree

__all__ = [
    "GLMPrefixConfig", "PrefixModel", "FrozenPrefixModel", "prefix_config_for", "prefixed_forward", "prefixed_mask",
    "kv_head_slice", "add_prefix", "load_prefix", "check_prefix",
    "PREFIX_CONFIG_NAME", "PREFIX_WEIGHTS_NAME",
]


@dataclass
class GLMPrefixConfig(PrefixConfig):
    """PaddleNLP's `PrefixConfig`, plus the K/V head size (PaddleNLP assumes hidden_size / num_attention_heads)."""

    head_dim: Optional[int] = field(default=None, metadata={"help": "Size of one K/V head."})


def prefix_config_for(model, pre_seq_len: int, projection: bool = False, projection_hidden_size: Optional[int] = None,
                      dropout: float = 0.0) -> GLMPrefixConfig:
    """The prefix geometry of `model` (its family's layers, K/V heads and head size)."""
    family, config = family_of(model.config), model.config
    kv_heads = family.kv_heads(config)
    heads = int(config.num_attention_heads)
    return GLMPrefixConfig(
        prefix_dropout=dropout, num_prefix_tokens=pre_seq_len, num_attention_heads=heads,
        multi_query_group_num=kv_heads if kv_heads != heads else None, num_hidden_layers=family.num_layers(config),
        hidden_size=int(config.hidden_size), prefix_projection=projection,
        prefix_projection_hidden_size=(projection_hidden_size or int(config.hidden_size)) if projection else None,
        tensor_parallel_degree=-1, dtype=str(config.dtype or paddle.get_default_dtype()),
        head_dim=family.head_dim(config),
    )


def _geometry(config: PrefixConfig) -> Tuple[int, int, int, int]:
    """(prefix tokens, layers, K/V heads, head size) of a prefix config."""
    kv_heads = config.multi_query_group_num or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_prefix_tokens, config.num_hidden_layers, kv_heads, head_dim


def _prefix_encoder(config: PrefixConfig) -> nn.Sequential:
    """PaddleNLP's (single-process) encoder, layer for layer, so its state-dict keys are the same."""
    tokens, layers, kv_heads, head_dim = _geometry(config)
    width, out = kv_heads * head_dim, 2 * layers * kv_heads * head_dim
    dropout = nn.Dropout(config.prefix_dropout)
    if not config.prefix_projection:
        return nn.Sequential(nn.Embedding(tokens, out), dropout)
    hidden = config.prefix_projection_hidden_size
    return nn.Sequential(nn.Embedding(tokens, width), nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, out),
                         dropout)


def kv_head_slice(model_config, kv_heads: int) -> Tuple[int, int]:
    """(first K/V head, count) this tensor-parallel rank holds: the heads its query heads read.

    Rank r holds query heads [r H/N, (r + 1) H/N); query head h reads K/V head h // (H / G). So a rank holds G/N
    K/V heads from r G/N when N <= G (every head when G = H), else the one group r // (N/G) that N/G ranks share
    (ChatGLM2's split rule, `models.chatglm2.kv_groups_per_rank`)."""
    degree = tensor_parallel_degree(model_config)
    heads = int(model_config.num_attention_heads)
    rank = int(getattr(model_config, "tensor_parallel_rank", 0) or 0) if degree > 1 else 0
    return rank * (heads // degree) // (heads // kv_heads), max(kv_heads // degree, 1)


def prefixed_mask(attention_mask: Optional[Tensor], prefix_length: int) -> Optional[Tensor]:
    """A caller's mask over the real tokens, extended to the prefix columns (visible to every query).

    1-D sep [B]: the prefix joins the bidirectional part (sep + P; for sep 0 the prefix columns lie before every
    query, so causal attention sees them too). Dense [..., q, k]: P columns of ones on the left. None: the model's
    default over the whole cache (GLM's and ChatGLM-6B's bidirectional, ChatGLM2's causal) sees the prefix."""
    if attention_mask is None:
        return None
    if attention_mask.ndim == 1:
        return attention_mask + prefix_length
    # ones [..., q, P] built from the mask itself, so dynamic batch and query sizes trace into static graphs
    columns = paddle.ones_like(attention_mask[..., :1]) * paddle.ones([prefix_length], dtype=attention_mask.dtype)
    return paddle.concat([columns, attention_mask], axis=-1)


def prefixed_forward(model: nn.Layer, prefix_length: int, input_ids: Tensor, position_ids: Optional[Tensor],
                     attention_mask: Optional[Tensor], cache: KVCache, **kwargs):
    """`model`'s forward over a cache whose first `prefix_length` tokens are a prefix: the prefix alone (the call
    that starts a sequence) or what an earlier call returned. The mask is the caller's, over the real tokens only
    (`prefixed_mask` adds the prefix columns); the positions are the real tokens' own."""
    if position_ids is None:
        raise ValueError("a prefix-tuned model needs explicit position_ids: the default positions count from the "
                         "cache length, which includes the prefix")
    return model(input_ids, position_ids, prefixed_mask(attention_mask, prefix_length), cache=cache, **kwargs)


class PrefixModel(PrefixModelForCausalLM):
    """A frozen model of any family behind a trained prefix (PaddleNLP's class, so its Trainer saves, resumes and
    loads the best checkpoint of it as of its own prefix models; the computation is ours)."""

    def __init__(self, model: nn.Layer, prefix_config: GLMPrefixConfig) -> None:
        nn.Layer.__init__(self)  # PaddleNLP's __init__ builds its own (tensor-parallel-split) encoder
        self.model, self.config, self.prefix_config = model, model.config, prefix_config
        prefix_config.tensor_parallel_degree = -1  # whole on every rank, whatever the model's degree
        tokens, self.num_layers, self.kv_heads, self.head_dim = _geometry(prefix_config)
        self.first_head, self.rank_heads = kv_head_slice(model.config, self.kv_heads)
        with dtype_guard(prefix_config.dtype):
            self.prefix_encoder = _prefix_encoder(prefix_config)
        self.prefix_tokens = paddle.arange(tokens, dtype="int64")
        self.mark_only_prefix_as_trainable()

    def past_key_values(self, batch: int) -> KVCache:
        """This rank's prefix cache: one (key, value) [batch, P, rank's K/V heads, head_dim] per layer."""
        flat = self.prefix_encoder(self.prefix_tokens.unsqueeze(0).expand([batch, -1]))  # (B, P, 2 L G hd)
        if tensor_parallel_degree(self.config) > 1:
            flat = copy_to_model_parallel(flat)  # each rank's loss reaches its heads only: sum the gradients
        tokens = self.prefix_config.num_prefix_tokens
        kv = flat.reshape([batch, tokens, 2, self.num_layers, self.kv_heads, self.head_dim])
        kv = kv[:, :, :, :, self.first_head:self.first_head + self.rank_heads]  # (B, P, 2, L, g, hd)
        return [(kv[:, :, 0, layer], kv[:, :, 1, layer]) for layer in range(self.num_layers)]

    def forward(self, input_ids: Tensor, position_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                cache: Optional[KVCache] = None, **kwargs):
        """The model's forward (same arguments and outputs) over the prefix; see `prefixed_forward`."""
        if cache is None:
            cache = self.past_key_values(input_ids.shape[0])
        return prefixed_forward(self.model, self.prefix_config.num_prefix_tokens, input_ids, position_ids,
                                attention_mask, cache, **kwargs)

    def generate(self, **kwargs):
        raise NotImplementedError("decode a prefix-tuned model with paddle_glm.generation.generate")

    @paddle.no_grad()
    def frozen(self) -> "FrozenPrefixModel":
        """The model with this prefix computed once (eval mode: no dropout), for export."""
        was_training = self.prefix_encoder.training
        self.prefix_encoder.eval()
        cache = self.past_key_values(1)
        if was_training:
            self.prefix_encoder.train()
        return FrozenPrefixModel(self.model, paddle.stack([paddle.stack([k[0], v[0]]) for k, v in cache]))

    def save_pretrained(self, save_directory: str, merge_tensor_parallel: bool = False, **kwargs) -> None:
        """`prefix_config.json` + `prefix_model_state.pdparams` (the encoder alone, whole), from the main process;
        the Trainer's other arguments (variant, save_function, ...) do not apply to a whole prefix."""
        if os.path.isfile(save_directory):
            raise InputError(f"{save_directory} is a file: prefixes are saved to a directory")
        os.makedirs(save_directory, exist_ok=True)
        if kwargs.get("is_main_process", paddle.distributed.get_rank() == 0):
            self.prefix_config.save_pretrained(save_directory)
            paddle.save(self.prefix_encoder.state_dict(), os.path.join(save_directory, PREFIX_WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, model: nn.Layer, prefix_path: str, **kwargs) -> "PrefixModel":
        """The prefix saved at `prefix_path` on `model`, after `check_prefix`."""
        config, state = check_prefix(model, prefix_path)
        prefix_model = cls(model, config)
        prefix_model.prefix_encoder.set_state_dict(state)
        return prefix_model

    def print_trainable_parameters(self) -> None:
        trainable = sum(int(p.numel()) for p in self.parameters() if not p.stop_gradient)
        total = sum(int(p.numel()) for p in self.parameters())
        tokens, layers, kv_heads, head_dim = _geometry(self.prefix_config)
        hidden = self.prefix_config.prefix_projection_hidden_size
        shape = (f"{tokens} tokens x {kv_heads * head_dim} wide through a {hidden}-wide projection"
                 if self.prefix_config.prefix_projection else
                 f"{layers} layers x 2 x {tokens} tokens x {kv_heads} K/V heads x {head_dim}")
        logger.info(f"P-Tuning v2: {trainable} of {total} parameters train ({100.0 * trainable / total:.3f}%): {shape}")


class FrozenPrefixModel(nn.Layer):
    """A model whose cache starts from a fixed prefix [layers, 2, P, kv_heads, head_dim] (a persistable buffer, so
    exported graphs hold it and their runners pass nothing new)."""

    def __init__(self, model: nn.Layer, prefix: Tensor) -> None:
        super().__init__()
        self.model, self.config = model, model.config
        self.register_buffer("prefix_cache", prefix, persistable=True)

    def forward(self, input_ids: Tensor, position_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                cache: Optional[KVCache] = None, **kwargs):
        if cache is None:
            # (B, 1, 1, 1) ones times (P, g, hd): the prefix for a batch whose size the graph only knows at run time
            rows = paddle.ones_like(input_ids[:, :1], dtype=self.prefix_cache.dtype).unsqueeze(-1).unsqueeze(-1)
            cache = [(rows * self.prefix_cache[i, 0], rows * self.prefix_cache[i, 1])
                     for i in range(self.prefix_cache.shape[0])]
        return prefixed_forward(self.model, self.prefix_cache.shape[2], input_ids, position_ids, attention_mask, cache,
                                **kwargs)


def add_prefix(model: nn.Layer, args) -> PrefixModel:
    """Wrap `model` with a new prefix from `args` (ModelArguments: --pre_seq_len, --prefix_projection,
    --prefix_hidden_size, --prefix_dropout), or the one saved at `args.prefix_path`; only the prefix trains."""
    if args.prefix_path:
        prefix_model = load_prefix(model, args.prefix_path)
        prefix_model.mark_only_prefix_as_trainable()
    else:
        config = prefix_config_for(model, args.pre_seq_len, args.prefix_projection, args.prefix_hidden_size,
                                   args.prefix_dropout)
        prefix_model = PrefixModel(model, config)
    prefix_model.print_trainable_parameters()
    return prefix_model


def load_prefix(model: nn.Layer, prefix_path: str) -> PrefixModel:
    """The prefix at `prefix_path` on `model`, in eval mode."""
    prefix_model = PrefixModel.from_pretrained(model, prefix_path)
    prefix_model.eval()
    return prefix_model


def check_prefix(model: nn.Layer, prefix_path: str) -> Tuple[GLMPrefixConfig, dict]:
    """(config, weights) of the prefix at `prefix_path`; an InputError naming the path and the mismatch when it
    cannot apply to `model` (PaddleNLP would start from a random prefix, or take what fits, with a log line)."""
    where = f"--prefix_path {prefix_path}"
    config_file, weights = (os.path.join(prefix_path, name) for name in (PREFIX_CONFIG_NAME, PREFIX_WEIGHTS_NAME))
    if not os.path.isdir(prefix_path):
        raise InputError(f"{where}: no such directory")
    if not os.path.isfile(config_file):
        raise InputError(f"{where}: no {PREFIX_CONFIG_NAME}, so not a prefix (training with --prefix_tuning writes "
                         "one)")
    try:
        config = GLMPrefixConfig.from_pretrained(prefix_path)
    except (json.JSONDecodeError, TypeError) as error:
        raise InputError(f"{where}: {PREFIX_CONFIG_NAME} is not a valid prefix config ({error})") from None
    if not os.path.isfile(weights):
        raise InputError(f"{where}: no {PREFIX_WEIGHTS_NAME} (the prefix weights)")
    if (config.tensor_parallel_degree or -1) > 1:
        raise InputError(f"{where}: a prefix split for {config.tensor_parallel_degree} ranks by PaddleNLP's rule (flat "
                         "blocks, not heads); merge it with PaddleNLP first")
    expected = prefix_config_for(model, config.num_prefix_tokens)
    problems = [f"{name} {got} but the model has {want}"
                for name, got, want in zip(("layers", "K/V heads", "head size"), _geometry(config)[1:],
                                           _geometry(expected)[1:]) if got != want]
    state = paddle.load(weights, return_numpy=True)
    if not problems:
        reference = _prefix_encoder(config).state_dict()
        problems += [f"no tensor {key}" for key in reference if key not in state]
        problems += [f"{key} has shape {list(state[key].shape)} but the config needs {list(value.shape)}"
                     for key, value in reference.items()
                     if key in state and list(state[key].shape) != list(value.shape)]
        problems += [f"unexpected tensor {key}" for key in state if key not in reference]
    if problems:
        raise InputError(f"{where} does not fit the model (a prefix of another model?): {'; '.join(problems[:4])}")
    return config, {key: np.asarray(value) for key, value in state.items()}
