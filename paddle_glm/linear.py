"""`x W + b` whose bias gradient is a matrix-vector product on CPU.

Paddle's CPU kernel for the gradient of a broadcast add sums the gradient's columns on one thread, element by
element: for glm-large's MLP at a batch of 8 x 566 tokens (4528 x 4096) it takes 288 ms, as long as the layer's
matmul, while `ones[1, rows] @ grad` takes 5 ms. On a 2-layer glm-large-shaped pre-training step the bias
gradients were ~1 s of ~13. Accelerators keep Paddle's own path, and so do static graphs (exports) and inference,
which take no gradients.
"""
from __future__ import annotations

from typing import Optional

import paddle
import paddle.nn as nn
from paddle import Tensor
from paddle.autograd import PyLayer

__all__ = ["Linear", "linear", "add_bias"]


class _AddBias(PyLayer):
    @staticmethod
    def forward(ctx, output: Tensor, bias: Tensor) -> Tensor:
        return output + bias

    @staticmethod
    def backward(ctx, grad: Tensor):
        rows = grad.reshape([-1, grad.shape[-1]])
        ones = paddle.ones([1, rows.shape[0]], dtype=rows.dtype)
        return grad, paddle.matmul(ones, rows).reshape([-1])


def _fast_bias_grad(x: Tensor, bias: Optional[Tensor]) -> bool:
    return paddle.in_dynamic_mode() and bias is not None and not bias.stop_gradient and paddle.is_grad_enabled() \
        and x.place.is_cpu_place()  # (a static graph's tensors have no place)


def add_bias(output: Tensor, bias: Optional[Tensor]) -> Tensor:
    """`output + bias` (None: no bias), with the bias gradient as a matrix-vector product when one is taken on CPU."""
    if bias is None:
        return output
    return _AddBias.apply(output, bias) if _fast_bias_grad(output, bias) else output + bias


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """`F.linear(x, weight, bias)`, with `add_bias`'s bias gradient when one is taken on CPU."""
    if _fast_bias_grad(x, bias):
        return _AddBias.apply(paddle.matmul(x, weight), bias)
    return nn.functional.linear(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, names and initialisation) over `linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
