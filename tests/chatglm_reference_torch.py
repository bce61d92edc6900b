"""An independent PyTorch ChatGLM-6B for the tests: THUDM's forward pass, inputs and padding.

Written from the semantics of THUDM's chatglm-6b `modeling_chatglm.py` (RotaryEmbedding, SelfAttention.attention_fn,
GLMBlock, get_masks, get_position_ids) and its tokenizer's left padding, in THUDM's own layout (sequence first,
[S, B, ...]), over a state dict with THUDM's names and torch's [out, in] Linear layout. THUDM's masks are boolean
with True = masked. Nothing here comes from paddle_glm, so the tests compare our model against the reference, not
against itself.
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

State = Dict[str, torch.Tensor]
MASK_FILL = -10000.0


def thudm_inv_freq(head_dim: int) -> torch.Tensor:
    """RotaryEmbedding.__init__ for one rotary half (dim = head_dim / 2): float32 frequencies made half."""
    dim = head_dim // 2
    return (1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))).half()


def thudm_rotary_table(head_dim: int, length: int, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """RotaryEmbedding.forward after the model was cast to `dtype` (its buffer follows `.half()`/`.float()`):
    cos, sin [length, head_dim / 2] computed in the buffer's precision."""
    inv_freq = thudm_inv_freq(head_dim).to(dtype)
    t = torch.arange(length, dtype=inv_freq.dtype)
    freqs = torch.einsum("i,j->ij", t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def random_thudm_state(num_layers: int, vocab: int, hidden: int, inner: int, num_heads: int, seed: int = 0) -> State:
    """A ChatGLM-6B state dict as THUDM's checkpoint names it (rotary buffers and the tied lm_head included)."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std + mean

    scale = 1.0 / math.sqrt(hidden)
    state = {"transformer.word_embeddings.weight": normal(vocab, hidden, std=1.0)}
    for i in range(num_layers):
        layer = f"transformer.layers.{i}."
        state.update({
            layer + "input_layernorm.weight": normal(hidden, std=0.2, mean=1.0),
            layer + "input_layernorm.bias": normal(hidden, std=0.1),
            layer + "attention.rotary_emb.inv_freq": thudm_inv_freq(hidden // num_heads),
            # big queries and keys: the attention then depends sharply on positions and masks
            layer + "attention.query_key_value.weight": normal(3 * hidden, hidden, std=4 * scale),
            layer + "attention.query_key_value.bias": normal(3 * hidden, std=0.1),
            layer + "attention.dense.weight": normal(hidden, hidden, std=scale),
            layer + "attention.dense.bias": normal(hidden, std=0.1),
            layer + "post_attention_layernorm.weight": normal(hidden, std=0.2, mean=1.0),
            layer + "post_attention_layernorm.bias": normal(hidden, std=0.1),
            layer + "mlp.dense_h_to_4h.weight": normal(inner, hidden, std=scale),
            layer + "mlp.dense_h_to_4h.bias": normal(inner, std=0.1),
            layer + "mlp.dense_4h_to_h.weight": normal(hidden, inner, std=0.5 * scale),
            layer + "mlp.dense_4h_to_h.bias": normal(hidden, std=0.1),
        })
    state["transformer.final_layernorm.weight"] = normal(hidden, std=0.2, mean=1.0)
    state["transformer.final_layernorm.bias"] = normal(hidden, std=0.1)
    state["lm_head.weight"] = state["transformer.word_embeddings.weight"]
    return state


def thudm_batch(sequences: List[List[int]], bos: int, gmask: int, pad: int):
    """get_masks + get_position_ids for each sequence (`... [gMASK] <sop> ...`), then left padding as THUDM's
    tokenizer `_pad` does: ids [B, L], position_ids [B, 2, L] (pads 0), attention_mask [B, 1, L, L] bool, True =
    masked (pad rows and columns masked)."""
    length = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), length), pad, dtype=torch.long)
    positions = torch.zeros((len(sequences), 2, length), dtype=torch.long)
    masks = torch.ones((len(sequences), 1, length, length), dtype=torch.bool)
    for row, sequence in enumerate(sequences):
        n, start = len(sequence), length - len(sequence)
        context, mask_position = sequence.index(bos), sequence.index(gmask)
        visible = torch.ones(n, n).tril()
        visible[:, :context] = 1
        masks[row, 0, start:, start:] = visible < 0.5
        position = torch.arange(n)
        position[context:] = mask_position
        block = torch.cat([torch.zeros(context, dtype=torch.long), torch.arange(1, n - context + 1)])
        positions[row, :, start:] = torch.stack([position, block])
        ids[row, start:] = torch.tensor(sequence)
    return ids, positions, masks


def _gelu(x: torch.Tensor) -> torch.Tensor:
    """THUDM's gelu_impl (OpenAI's tanh approximation)."""
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=x1.ndim - 1)


def _apply_rotary_index(q, k, cos, sin, position_id):
    """apply_rotary_pos_emb_index: q, k [S, B, nh, d]; cos, sin [max, d]; position_id [S, B]."""
    cos, sin = F.embedding(position_id, cos).unsqueeze(2), F.embedding(position_id, sin).unsqueeze(2)
    return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)


def _attention(p, hidden, position_ids, mask, num_heads: int, layer_id: int):
    """SelfAttention.forward + attention_fn on [S, B, H] states."""
    length, batch, _ = hidden.shape
    mixed = F.linear(hidden, p("attention.query_key_value.weight"), p("attention.query_key_value.bias"))
    mixed = mixed.view(length, batch, num_heads, -1)
    head_dim = mixed.shape[-1] // 3
    q, k, v = torch.split(mixed, head_dim, dim=-1)
    q1, q2 = q.chunk(2, dim=-1)
    k1, k2 = k.chunk(2, dim=-1)
    cos, sin = thudm_rotary_table(head_dim, int(position_ids.max()) + 1, hidden.dtype)
    q1, k1 = _apply_rotary_index(q1, k1, cos, sin, position_ids[:, 0, :].transpose(0, 1))
    q2, k2 = _apply_rotary_index(q2, k2, cos, sin, position_ids[:, 1, :].transpose(0, 1))
    q, k = torch.cat([q1, q2], dim=-1), torch.cat([k1, k2], dim=-1)

    coeff = float(layer_id + 1)
    q = q / (math.sqrt(head_dim) * coeff)
    scores = torch.bmm(q.reshape(length, batch * num_heads, -1).transpose(0, 1),
                       k.reshape(length, batch * num_heads, -1).transpose(0, 1).transpose(1, 2))
    scores = scores.view(batch, num_heads, length, length)
    scores = scores.masked_fill(mask, MASK_FILL)
    dtype = scores.dtype
    # THUDM's `.float()`; float64 runs (the tests' exact comparisons) stay float64
    probs = F.softmax(scores.to(torch.promote_types(dtype, torch.float32)) * coeff, dim=-1).type(dtype)
    context = torch.bmm(probs.view(batch * num_heads, length, length), v.reshape(length, batch * num_heads, -1).transpose(0, 1))
    context = context.view(batch, num_heads, length, head_dim).permute(2, 0, 1, 3).reshape(length, batch, -1)
    return F.linear(context, p("attention.dense.weight"), p("attention.dense.bias"))


def chatglm_logits(state: State, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                   num_heads: int) -> torch.Tensor:
    """ChatGLMForConditionalGeneration's logits [B, S, V] for ids [B, S], positions [B, 2, S] and a bool mask
    [B, 1, S, S] (True = masked), computed and returned in the precision of `state`'s tensors."""
    layers = 1 + max(int(key.split(".")[2]) for key in state if key.startswith("transformer.layers."))
    alpha = (2 * layers) ** 0.5
    hidden = F.embedding(input_ids, state["transformer.word_embeddings.weight"]).transpose(0, 1)  # [S, B, H]
    width = hidden.shape[-1]
    for i in range(layers):
        p = lambda name: state[f"transformer.layers.{i}.{name}"]  # noqa: E731
        attention_input = F.layer_norm(hidden, (width,), p("input_layernorm.weight"), p("input_layernorm.bias"), 1e-5)
        attention_output = _attention(p, attention_input, position_ids, attention_mask, num_heads, i)
        hidden = attention_input * alpha + attention_output
        mlp_input = F.layer_norm(hidden, (width,), p("post_attention_layernorm.weight"), p("post_attention_layernorm.bias"), 1e-5)
        mlp_output = F.linear(_gelu(F.linear(mlp_input, p("mlp.dense_h_to_4h.weight"), p("mlp.dense_h_to_4h.bias"))),
                              p("mlp.dense_4h_to_h.weight"), p("mlp.dense_4h_to_h.bias"))
        hidden = mlp_input * alpha + mlp_output
    hidden = F.layer_norm(hidden, (width,), state["transformer.final_layernorm.weight"],
                          state["transformer.final_layernorm.bias"], 1e-5)
    return F.linear(hidden, state["lm_head.weight"]).permute(1, 0, 2)


def chatglm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ChatGLMForConditionalGeneration's loss (on float32 logits, or float64 ones in the tests' exact runs):
    predict token t + 1 at position t, -100 ignored."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
