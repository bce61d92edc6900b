"""Model FLOPs utilisation: the FLOPs a training step needs by the model's shape, against a matmul peak measured on
the same machine, so MFU means the same on a laptop CPU and on a GPU.

A step's FLOPs are forward + backward = 3 x forward; forward counts, per token, 2 FLOPs per weight of the
transformer's linear layers; per (query, key) pair and layer, 4 x hidden (scores and weighted values over the full
S x S, as the attention computes them); per position projected to the vocabulary (where the loss is), 2 x hidden x
vocabulary. For GLM this is `24 h^2` per token and layer, `bench/bench_train.py`'s count. Layer norms, softmax,
biases and the embedding lookup are left out (they are not matmuls).
"""
from __future__ import annotations

import time
from typing import Sequence

import paddle
import paddle.nn as nn

from .parallel import ColumnParallelLinear, RowParallelLinear

__all__ = ["linear_weights", "step_flops", "matmul_peak"]

_LINEAR = (nn.Linear, ColumnParallelLinear, RowParallelLinear)


def linear_weights(model: nn.Layer, vocab_size: int, tensor_parallel_degree: int = 1) -> int:
    """Weights of the whole model's linear layers that every token passes (a tensor-parallel rank holds 1/degree of
    each split one), leaving out an output projection to the vocabulary (it runs at loss positions only)."""
    total = 0
    for layer in model.sublayers():
        if isinstance(layer, _LINEAR):
            rows, columns = layer.weight.shape
            split = tensor_parallel_degree if layer.weight.is_distributed else 1
            outputs = columns * split if isinstance(layer, ColumnParallelLinear) else columns
            if outputs != vocab_size:
                total += rows * columns * split
    return total


def step_flops(weights: int, hidden: int, layers: int, vocab: int, lengths: Sequence[int], projected: int) -> float:
    """Forward + backward FLOPs of a step over examples of `lengths` with `projected` positions scored."""
    tokens = sum(lengths)
    pairs = sum(length * length for length in lengths)
    forward = 2 * weights * tokens + 4 * hidden * layers * pairs + 2 * hidden * vocab * projected
    return 3.0 * forward


def matmul_peak(size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a size^3 float32 `paddle.matmul` on the current device, best of `repeats`."""
    a = paddle.randn([size, size], dtype="float32")
    b = paddle.randn([size, size], dtype="float32")
    float(paddle.matmul(a, b)[0, 0])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        float(paddle.matmul(a, b)[0, 0])  # reading a value waits for the device
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best
