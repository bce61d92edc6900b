"""Tensor-parallel layers for GLM on plain `paddle.distributed` collectives, so one code path runs on
gloo (CPU) and NCCL (GPU).

Paddle's own model-parallel layers (`fleet.meta_parallel.ColumnParallelLinear`, ...) call `c_identity`,
`c_concat`, `c_split` and `c_softmax_with_cross_entropy`, which have no CPU kernels; here the four
communication patterns Megatron-style tensor parallelism needs are `PyLayer`s over `all_reduce` and
`all_gather`. Parameter names and shapes match PaddleNLP's layers, so shards saved by either load in
the other (`model_state.tpXX.pdparams`, split by `GLMPretrainedModel._get_tensor_parallel_mappings`).
The topology comes from fleet's hybrid communicate group (`fleet.init` with `mp_degree`).
"""
from __future__ import annotations

import paddle
import paddle.distributed as dist
import paddle.nn as nn
from paddle import Tensor
from paddle.autograd import PyLayer
from paddle.distributed import fleet

from . import gloo_groups
from .linear import add_bias, linear

gloo_groups.install()  # before fleet.init forms its groups: tensor x data parallel groups on gloo need it

__all__ = [
    "model_parallel_group", "copy_to_model_parallel", "reduce_from_model_parallel", "gather_from_model_parallel",
    "VocabParallelEmbedding", "ColumnParallelLinear", "RowParallelLinear", "parallel_cross_entropy",
    "tensor_parallel_degree",
]


def model_parallel_group():
    return fleet.get_hybrid_communicate_group().get_model_parallel_group()


def _all_reduce(tensor: Tensor, op=dist.ReduceOp.SUM) -> Tensor:
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=op, group=model_parallel_group())
    return tensor


def _gather_last_dim(tensor: Tensor) -> Tensor:
    group = model_parallel_group()
    parts = []
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return paddle.concat(parts, axis=-1)


def _split_last_dim(tensor: Tensor) -> Tensor:
    group = model_parallel_group()
    return paddle.split(tensor, group.nranks, axis=-1)[group.rank]


class _CopyToModelParallel(PyLayer):
    """Identity forward; the gradient, summed over the ranks that each used the input, backward."""

    @staticmethod
    def forward(ctx, tensor):
        return tensor.clone()

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad)


class _ReduceFromModelParallel(PyLayer):
    """Sum of the ranks' partial results forward; the (replicated) gradient passes through backward."""

    @staticmethod
    def forward(ctx, tensor):
        return _all_reduce(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _GatherFromModelParallel(PyLayer):
    """Concatenates the ranks' slices of the last dimension; backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx, tensor):
        return _gather_last_dim(tensor)

    @staticmethod
    def backward(ctx, grad):
        return _split_last_dim(grad)


def copy_to_model_parallel(tensor: Tensor) -> Tensor:
    return _CopyToModelParallel.apply(tensor)


def reduce_from_model_parallel(tensor: Tensor) -> Tensor:
    return _ReduceFromModelParallel.apply(tensor)


def gather_from_model_parallel(tensor: Tensor) -> Tensor:
    return _GatherFromModelParallel.apply(tensor)


def _rank_and_degree():
    hcg = fleet.get_hybrid_communicate_group()
    return hcg.get_model_parallel_rank(), hcg.get_model_parallel_world_size()


def _divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"{what} ({total}) is not divisible by --tensor_parallel_degree {parts}")
    return total // parts


class VocabParallelEmbedding(nn.Layer):
    """Rows [rank * V/N, (rank + 1) * V/N) of the embedding; lookups outside are zero, then summed."""

    def __init__(self, vocab_size: int, hidden_size: int, weight_attr=None):
        super().__init__()
        rank, degree = _rank_and_degree()
        self.per_rank = _divide(vocab_size, degree, "vocab_size")
        self.start = rank * self.per_rank
        self.weight = self.create_parameter([self.per_rank, hidden_size], attr=weight_attr)
        self.weight.is_distributed = True

    def forward(self, input_ids: Tensor) -> Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        embedded = nn.functional.embedding(paddle.where(outside, paddle.zeros_like(local), local), self.weight)
        embedded = embedded * (~outside).astype(embedded.dtype).unsqueeze(-1)
        return reduce_from_model_parallel(embedded)


class ColumnParallelLinear(nn.Layer):
    """y[..., this rank's out/N columns] = x W + b; the input is replicated, the output stays split."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        _, degree = _rank_and_degree()
        per_rank = _divide(out_features, degree, "output features")
        self.weight = self.create_parameter([in_features, per_rank])
        self.bias = self.create_parameter([per_rank], is_bias=True) if bias else None
        self.weight.is_distributed = True
        if bias:
            self.bias.is_distributed = True

    def forward(self, hidden_states: Tensor) -> Tensor:
        return linear(copy_to_model_parallel(hidden_states), self.weight, self.bias)


class RowParallelLinear(nn.Layer):
    """y = sum over ranks of x[..., this rank's in/N] W_rank, + b: the input comes split, the output replicated."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        _, degree = _rank_and_degree()
        self.weight = self.create_parameter([_divide(in_features, degree, "input features"), out_features])
        self.bias = self.create_parameter([out_features], is_bias=True) if bias else None
        self.weight.is_distributed = True

    def forward(self, hidden_states: Tensor) -> Tensor:
        return add_bias(reduce_from_model_parallel(paddle.matmul(hidden_states, self.weight)), self.bias)


def parallel_cross_entropy(
    logits: Tensor, labels: Tensor, vocab_start: int, vocab_size: int, label_smoothing: float = 0.0
) -> Tensor:
    """Per-token cross-entropy over vocabulary-sharded logits [.., V/N], never gathering the vocabulary.

    logsumexp from the global max and summed exponentials; the label's logit from the one rank that
    holds it; label smoothing needs the mean logit over the whole vocabulary.
    """
    logits = logits.astype("float32")
    with paddle.no_grad():
        global_max = _all_reduce(logits.max(axis=-1, keepdim=True), op=dist.ReduceOp.MAX)
    shifted = logits - global_max
    log_normalizer = paddle.log(reduce_from_model_parallel(paddle.exp(shifted).sum(axis=-1)))
    local = labels.astype("int64") - vocab_start
    outside = (local < 0) | (local >= logits.shape[-1])
    picked = paddle.take_along_axis(shifted, paddle.where(outside, paddle.zeros_like(local), local).unsqueeze(-1), axis=-1)
    target = reduce_from_model_parallel(picked.squeeze(-1) * (~outside).astype("float32"))
    token_loss = log_normalizer - target
    if label_smoothing > 0:
        mean_logit = reduce_from_model_parallel(shifted.sum(axis=-1)) / vocab_size
        token_loss = log_normalizer - (1.0 - label_smoothing) * target - label_smoothing * mean_logit
    return token_loss


def tensor_parallel_degree(config) -> int:
    return max(1, int(getattr(config, "tensor_parallel_degree", 1) or 1))
