"""An independent PyTorch GLM for the conversion tests: THUDM's forward pass and its model-parallel split.

Written from THUDM/GLM's model/modeling_glm.py, mpu/transformer.py, mpu/layers.py and change_mp.py, over a
state dict with THUDM's names and torch's [out, in] Linear layout. Nothing here comes from paddle_glm, so the
tests compare our conversion and our model against the reference, not against themselves.
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch

State = Dict[str, torch.Tensor]


def random_thudm_state(num_layers: int, vocab: int, hidden: int, max_sequence_length: int, seed: int = 0) -> State:
    """A GLM state dict as THUDM's GLMModel names it, with weights big enough that mistakes show in the logits."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std + mean

    state = {
        "word_embeddings.weight": normal(vocab, hidden, std=0.5),
        "transformer.position_embeddings.weight": normal(max_sequence_length + 1, hidden, std=0.5),
        "transformer.block_position_embeddings.weight": normal(max_sequence_length + 1, hidden, std=0.5),
    }
    scale = 1.0 / math.sqrt(hidden)
    for i in range(num_layers):
        layer = f"transformer.layers.{i}."
        state.update({
            layer + "input_layernorm.weight": normal(hidden, std=0.2, mean=1.0),
            layer + "input_layernorm.bias": normal(hidden, std=0.1),
            layer + "attention.query_key_value.weight": normal(3 * hidden, hidden, std=2 * scale),
            layer + "attention.query_key_value.bias": normal(3 * hidden, std=0.1),
            layer + "attention.dense.weight": normal(hidden, hidden, std=scale),
            layer + "attention.dense.bias": normal(hidden, std=0.1),
            layer + "post_attention_layernorm.weight": normal(hidden, std=0.2, mean=1.0),
            layer + "post_attention_layernorm.bias": normal(hidden, std=0.1),
            layer + "mlp.dense_h_to_4h.weight": normal(4 * hidden, hidden, std=scale),
            layer + "mlp.dense_h_to_4h.bias": normal(4 * hidden, std=0.1),
            layer + "mlp.dense_4h_to_h.weight": normal(hidden, 4 * hidden, std=0.5 * scale),
            layer + "mlp.dense_4h_to_h.bias": normal(hidden, std=0.1),
        })
    state["transformer.final_layernorm.weight"] = normal(hidden, std=0.2, mean=1.0)
    state["transformer.final_layernorm.bias"] = normal(hidden, std=0.1)
    return state


def split_model_parallel(state: State, ranks: int) -> List[State]:
    """What each of `ranks` model-parallel GPUs holds, by mpu's rules (as change_mp.py splits them).

    VocabParallelEmbedding and ColumnParallelLinear split dim 0; RowParallelLinear splits its weight's dim 1
    and replicates its bias; the fused QKV is ColumnParallelLinear(stride=3): the [3h, h] weight is cut into
    3 * ranks row blocks and rank r takes blocks r, r + ranks, r + 2 * ranks, i.e. [q_r; k_r; v_r].
    """
    shards: List[State] = [{} for _ in range(ranks)]
    for name, tensor in state.items():
        if "query_key_value" in name:
            blocks = torch.chunk(tensor, 3 * ranks, dim=0)
            parts = [torch.cat(blocks[r::ranks], dim=0) for r in range(ranks)]
        elif name.endswith(".weight") and tensor.dim() == 2 and "position" not in name:
            dim = 0 if ("word_embeddings" in name or "dense_h_to_4h" in name) else 1
            parts = list(torch.chunk(tensor, ranks, dim=dim))
        elif "dense_h_to_4h.bias" in name:
            parts = list(torch.chunk(tensor, ranks, dim=0))
        else:
            parts = [tensor] * ranks
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    return shards


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps=1e-5)


def _gelu(x: torch.Tensor) -> torch.Tensor:
    """mpu/transformer.py's gelu_impl (OpenAI's tanh approximation)."""
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def glm_logits(state: State, input_ids: torch.Tensor, position_ids: torch.Tensor, sep: torch.Tensor,
               num_heads: int) -> torch.Tensor:
    """GLMModel.forward with output_predict: [B, S] ids, [B, 2, S] positions, [B] part-A lengths -> [B, S, V]."""
    batch, length = input_ids.shape
    hidden = state["word_embeddings.weight"][input_ids]
    hidden = hidden + state["transformer.position_embeddings.weight"][position_ids[:, 0]]
    hidden = hidden + state["transformer.block_position_embeddings.weight"][position_ids[:, 1]]
    # Part A (the first sep tokens) is seen by every token, part B causally.
    mask = torch.tril(torch.ones(length, length, dtype=hidden.dtype)).expand(batch, length, length).clone()
    mask[torch.arange(length).view(1, 1, -1).expand(batch, length, length) < sep.view(-1, 1, 1)] = 1.0
    mask = mask.unsqueeze(1)
    head_dim = hidden.shape[-1] // num_heads
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("transformer.layers."))
    for i in range(layers):
        p = lambda name: state[f"transformer.layers.{i}.{name}"]  # noqa: E731
        x = _layer_norm(hidden, p("input_layernorm.weight"), p("input_layernorm.bias"))
        mixed = x @ p("attention.query_key_value.weight").T + p("attention.query_key_value.bias")
        q, k, v = (t.view(batch, length, num_heads, head_dim).permute(0, 2, 1, 3) for t in mixed.chunk(3, dim=-1))
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
        scores = scores * mask - 10000.0 * (1.0 - mask)
        context = (torch.softmax(scores, dim=-1) @ v).permute(0, 2, 1, 3).reshape(batch, length, -1)
        hidden = hidden + context @ p("attention.dense.weight").T + p("attention.dense.bias")
        x = _layer_norm(hidden, p("post_attention_layernorm.weight"), p("post_attention_layernorm.bias"))
        x = _gelu(x @ p("mlp.dense_h_to_4h.weight").T + p("mlp.dense_h_to_4h.bias"))
        hidden = hidden + x @ p("mlp.dense_4h_to_h.weight").T + p("mlp.dense_4h_to_h.bias")
    hidden = _layer_norm(hidden, state["transformer.final_layernorm.weight"], state["transformer.final_layernorm.bias"])
    return hidden @ state["word_embeddings.weight"].T
