"""Dropout whose CPU masks come from NumPy's SFC64 generator.

Paddle's CPU dropout draws every element from a Mersenne Twister on one thread: 480 ms forward for the attention
probabilities of eight 566-token glm-large-shaped samples (41M elements), which with its backward was a tenth of a
2-layer pre-training step. NumPy's SFC64 draws the same-sized mask in ~40 ms: forward + backward 584 -> 343 ms.
The generator is seeded from Paddle's global generator at each call, so masks follow `paddle.seed` and the RNG
state the Trainer saves in checkpoints (a resumed run draws the masks of the uninterrupted one). The mask is kept as
booleans for the backward pass, as Paddle's kernel keeps bytes. The drop probability is rounded to a multiple of
1/65536 (0.1 becomes 0.100006). Accelerators, static graphs and other modes keep `nn.Dropout`.
"""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn as nn
from paddle import Tensor
from paddle.autograd import PyLayer

__all__ = ["Dropout"]

_LEVELS = 1 << 16  # the mask compares uniform 16-bit integers with round(p * 2^16)


def _scale_kept(x: Tensor, keep: Tensor, scale: float) -> Tensor:
    return paddle.multiply(x, keep.astype(x.dtype)).scale_(scale)


class _ScaleKept(PyLayer):
    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return _scale_kept(x, keep, scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (keep,) = ctx.saved_tensor()
        return _scale_kept(grad, keep, ctx.scale)


def _keep_mask(shape) -> Tensor:
    high, low = (int(v) for v in paddle.randint(0, 2 ** 31 - 1, [2]).numpy())  # Paddle's generator: seeded, saved
    return np.random.Generator(np.random.SFC64((high << 31) | low)).integers(0, _LEVELS, size=shape, dtype=np.uint16)


class Dropout(nn.Dropout):
    """`nn.Dropout` ("upscale_in_train": kept elements scaled by 1 / (1 - p)) with NumPy-drawn masks on CPU."""

    def forward(self, x: Tensor) -> Tensor:
        fast = paddle.in_dynamic_mode() and self.training and 0 < self.p < 1 and self.axis is None \
            and self.mode == "upscale_in_train" and x.place.is_cpu_place()
        if not fast:
            return super().forward(x)
        keep = paddle.to_tensor(_keep_mask(x.shape) >= round(self.p * _LEVELS))
        return _ScaleKept.apply(x, keep, 1.0 / (1.0 - self.p))
