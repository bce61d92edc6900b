"""An independent PyTorch ChatGLM2/ChatGLM3 for the tests: THUDM's forward pass over THUDM's state dict.

Written from THUDM's modeling_chatglm.py (ChatGLM2-6B, ChatGLM3-6B, and ChatGLM3-6B-32k's `rope_ratio`):
sequence-first [s, b, h] activations; a [seq_length, rot/2, 2] table of [cos, sin] looked up by the position
ids; query/key rotation of interleaved pairs of the first half of each head's dims; K/V groups expanded to
the query heads (head h reads group h // (heads / groups)); a boolean mask where True hides a key, built by
THUDM's `get_masks` from a 2-D padding mask (pad rows then see every key); torch's
scaled_dot_product_attention; the cache concatenated whenever one is given; torch's [out, in] Linear layout
and the `transformer.` names of THUDM's Hugging Face releases. Nothing here comes from paddle_glm or
PaddleNLP, so the tests compare our model with THUDM's semantics, not with itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

State = Dict[str, torch.Tensor]
Cache = List[Tuple[torch.Tensor, torch.Tensor]]  # per layer (key, value), each [s, b, groups, kv_channels]


@dataclass
class Spec:
    """The ChatGLMConfig fields the forward pass reads (THUDM's names in comments where they differ)."""

    num_layers: int = 2
    vocab: int = 128  # padded_vocab_size
    hidden: int = 64
    heads: int = 4
    groups: int = 2  # multi_query_group_num
    kv_channels: int = 16
    ffn: int = 96  # ffn_hidden_size
    seq_length: int = 64
    rope_ratio: float = 1.0
    eps: float = 1e-5


def random_thudm_state(spec: Spec, seed: int = 0) -> State:
    """A state dict named and laid out as THUDM's ChatGLMForConditionalGeneration, with weights large enough
    that mistakes show in the logits (norm weights and QKV biases far from their usual 1 and 0)."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std + mean

    projection, qkv = spec.heads * spec.kv_channels, (spec.heads + 2 * spec.groups) * spec.kv_channels
    state = {
        "transformer.embedding.word_embeddings.weight": normal(spec.vocab, spec.hidden, std=1.0),
        "transformer.rotary_pos_emb.inv_freq": 1.0 / 10000 ** (torch.arange(0, spec.kv_channels // 2, 2) / (spec.kv_channels // 2)),
        "transformer.encoder.final_layernorm.weight": normal(spec.hidden, std=0.2, mean=1.0),
        "transformer.output_layer.weight": normal(spec.vocab, spec.hidden, std=2.0 / spec.hidden ** 0.5),
    }
    for i in range(spec.num_layers):
        layer = f"transformer.encoder.layers.{i}."
        state.update({
            layer + "input_layernorm.weight": normal(spec.hidden, std=0.2, mean=1.0),
            layer + "self_attention.query_key_value.weight": normal(qkv, spec.hidden, std=1.5 / spec.hidden ** 0.5),
            layer + "self_attention.query_key_value.bias": normal(qkv, std=0.3),
            layer + "self_attention.dense.weight": normal(spec.hidden, projection, std=1.0 / projection ** 0.5),
            layer + "post_attention_layernorm.weight": normal(spec.hidden, std=0.2, mean=1.0),
            layer + "mlp.dense_h_to_4h.weight": normal(2 * spec.ffn, spec.hidden, std=1.0 / spec.hidden ** 0.5),
            layer + "mlp.dense_4h_to_h.weight": normal(spec.hidden, spec.ffn, std=1.0 / spec.ffn ** 0.5),
        })
    return state


def rope_cache(spec: Spec) -> torch.Tensor:
    """[seq_length, kv_channels / 4, 2]: [cos, sin] of position * theta_i over the first kv_channels / 2 dims."""
    n_elem = spec.kv_channels // 2
    base = 10000 * spec.rope_ratio
    theta = 1.0 / (base ** (torch.arange(0, n_elem, 2, dtype=torch.float) / n_elem))
    angles = torch.outer(torch.arange(spec.seq_length, dtype=torch.float), theta)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


def apply_rotary_pos_emb(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x [s, b, n, d], rope [s, b or 1, r/2, 2]: rotate the pairs (x[2i], x[2i+1]) of the first r dims."""
    s, b, n, _ = x.shape
    r = rope.shape[-2] * 2
    x, passed = x[..., :r], x[..., r:]
    pairs = x.reshape(s, b, n, r // 2, 2)
    rope = rope.reshape(s, -1, 1, r // 2, 2)  # batch 1 without position ids: broadcast
    cos, sin = rope[..., 0], rope[..., 1]
    turned = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin], -1)
    return torch.cat([turned.flatten(3), passed], dim=-1)


def get_masks(input_ids: torch.Tensor, past_length: int, padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """THUDM's full mask [b, 1, s, past + s], True = hidden: causal, pad keys hidden, pad rows (prefill) see all."""
    batch, length = input_ids.shape
    full = torch.ones(batch, length, length).tril()
    if past_length:
        full = torch.cat([torch.ones(batch, length, past_length), full], dim=-1)
    if padding_mask is not None:
        full = full * padding_mask.unsqueeze(1)
        if not past_length:
            full -= padding_mask.unsqueeze(-1) - 1
    return (full < 0.5).unsqueeze(1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps))


def attention(state: State, prefix: str, spec: Spec, x: torch.Tensor, mask: Optional[torch.Tensor],
              rope: torch.Tensor, past: Optional[Tuple[torch.Tensor, torch.Tensor]]):
    s, b, _ = x.shape
    mixed = F.linear(x, state[prefix + "query_key_value.weight"], state[prefix + "query_key_value.bias"])
    q_width, kv_width = spec.heads * spec.kv_channels, spec.groups * spec.kv_channels
    query, key, value = mixed.split([q_width, kv_width, kv_width], dim=-1)
    query = apply_rotary_pos_emb(query.view(s, b, spec.heads, spec.kv_channels), rope)
    key = apply_rotary_pos_emb(key.view(s, b, spec.groups, spec.kv_channels), rope)
    value = value.view(s, b, spec.groups, spec.kv_channels)
    if past is not None:
        key, value = torch.cat([past[0], key]), torch.cat([past[1], value])
    present = (key, value)
    per_group = spec.heads // spec.groups
    key = key.unsqueeze(-2).expand(-1, -1, -1, per_group, -1).reshape(key.shape[0], b, spec.heads, spec.kv_channels)
    value = value.unsqueeze(-2).expand(-1, -1, -1, per_group, -1).reshape(value.shape[0], b, spec.heads, spec.kv_channels)
    query, key, value = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, d]
    if mask is None and query.shape[2] == key.shape[2]:
        context = F.scaled_dot_product_attention(query, key, value, is_causal=True)
    else:
        context = F.scaled_dot_product_attention(query, key, value, None if mask is None else ~mask)
    context = context.permute(2, 0, 1, 3).reshape(s, b, q_width)
    return F.linear(context, state[prefix + "dense.weight"]), present


def forward(state: State, spec: Spec, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
            attention_mask: Optional[torch.Tensor] = None, full_attention_mask: Optional[torch.Tensor] = None,
            past_key_values: Optional[Cache] = None) -> Tuple[torch.Tensor, Cache]:
    """Logits [b, s, V] and the new cache, as THUDM's ChatGLMModel + output layer compute them.

    `attention_mask` [b, past + s] is THUDM's 2-D padding mask (1 = real token); `full_attention_mask`
    [b, 1, s, past + s] a boolean mask given directly (True = hidden).
    """
    length = input_ids.shape[1]
    hidden = state["transformer.embedding.word_embeddings.weight"][input_ids].transpose(0, 1)  # [s, b, h]
    past_length = past_key_values[0][0].shape[0] if past_key_values else 0
    if full_attention_mask is None:
        if (attention_mask is not None and not attention_mask.all()) or (past_key_values and length != 1):
            full_attention_mask = get_masks(input_ids, past_length, attention_mask)
    rope = rope_cache(spec)
    rope = rope[position_ids] if position_ids is not None else rope[None, :length]
    rope = rope.transpose(0, 1)  # [s, b, r/2, 2]
    presents: Cache = []
    for i in range(spec.num_layers):
        prefix = f"transformer.encoder.layers.{i}."
        normed = rms_norm(hidden, state[prefix + "input_layernorm.weight"], spec.eps)
        attended, present = attention(state, prefix + "self_attention.", spec, normed, full_attention_mask, rope,
                                      past_key_values[i] if past_key_values else None)
        presents.append(present)
        hidden = hidden + attended
        normed = rms_norm(hidden, state[prefix + "post_attention_layernorm.weight"], spec.eps)
        gate, up = F.linear(normed, state[prefix + "mlp.dense_h_to_4h.weight"]).chunk(2, dim=-1)
        hidden = hidden + F.linear(F.silu(gate) * up, state[prefix + "mlp.dense_4h_to_h.weight"])
    hidden = rms_norm(hidden, state["transformer.encoder.final_layernorm.weight"], spec.eps)
    return F.linear(hidden, state["transformer.output_layer.weight"]).transpose(0, 1), presents
