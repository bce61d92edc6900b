"""Weight-only int8/int4 linear layers for the Paddle graph (Paddle Inference on a CUDA GPU).

`weight_only_paddle` replaces every `nn.Linear` of a half-precision model (the attention and MLP projections, and
an untied output layer such as ChatGLM2's) by a `WeightOnlyLinear`: its weight quantized once by Paddle's
`weight_quantize` (int8: one scale per output channel; int4: one scale per group of 128 inputs of an output
channel) and multiplied by `weight_only_linear`, which dequantizes on the fly. The tied output projection of GLM and
ChatGLM-6B (a matmul with the embedding table) and the embeddings stay in the export's dtype.

Why GPU only: Paddle has `weight_only_linear` kernels for CUDA alone (the CPU build does not even trace the op:
its PIR dialect knows no CPU dtype for it), so `export/exporter.py` calls this on CUDA builds only; on CPU a
quantized export is ONNX Runtime's MatMulNBits (`export.onnx_graph`). `weight_quantize` itself runs on CPU, and
writes the layout of the GPU architecture it is given (`arch`: the kernels' tile interleaving differs).
"""
from __future__ import annotations

import paddle
import paddle.nn as nn
from paddle.nn.quant import weight_only_linear, weight_quantize

__all__ = ["WeightOnlyLinear", "weight_only_paddle", "GROUP_SIZES", "WEIGHT_DTYPES"]

WEIGHT_DTYPES = {"weight_only_int8": "int8", "weight_only_int4": "int4"}
GROUP_SIZES = {"weight_only_int8": -1, "weight_only_int4": 128}  # -1: per output channel


class WeightOnlyLinear(nn.Layer):
    """`linear` [in, out] (+ bias) as int8 weight [out, in] or packed int4 [out / 2, in], with half-precision
    scales [out] (int8) or [in / 128, out] (int4), computed by `weight_only_linear`."""

    def __init__(self, linear: nn.Linear, quant: str, arch: int):
        super().__init__()
        if linear.weight.dtype not in (paddle.float16, paddle.bfloat16):
            raise ValueError(f"--quant {quant} for Paddle Inference quantizes float16 or bfloat16 weights, not "
                             f"{linear.weight.dtype}: export with --dtype bfloat16 (or float16)")
        self.weight_dtype, self.arch, self.group_size = WEIGHT_DTYPES[quant], arch, GROUP_SIZES[quant]
        weight, scale = weight_quantize(linear.weight, algo=quant, arch=arch, group_size=self.group_size)
        zeros = nn.initializer.Constant(0.0)  # the default (Xavier) has no int8 kernel
        self.weight = self.create_parameter(weight.shape, dtype=weight.dtype, default_initializer=zeros)
        self.weight.set_value(weight)
        self.weight_scale = self.create_parameter(scale.shape, dtype=scale.dtype, default_initializer=zeros)
        self.weight_scale.set_value(scale)
        self.bias = linear.bias

    def forward(self, x):
        return weight_only_linear(x, self.weight, self.bias, self.weight_scale, self.weight_dtype, self.arch,
                                  self.group_size)


def weight_only_paddle(model: nn.Layer, quant: str, arch: int) -> int:
    """Replace `model`'s `nn.Linear` layers in place (see the module docstring); returns how many."""
    if quant not in WEIGHT_DTYPES:
        raise ValueError(f"--quant {quant}: use {' or '.join(WEIGHT_DTYPES)}")
    replaced = 0
    for parent in [model] + list(model.sublayers()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):  # ours (`paddle_glm.linear`) too; an export holds no tensor-parallel ones
                setattr(parent, name, WeightOnlyLinear(child, quant, arch))
                replaced += 1
    return replaced
