"""Paddle's stride kernels off on CPU: `transpose` and slices then copy with Paddle's own kernels instead of
returning strided views.

With stride kernels on (Paddle 3's default), `transpose` returns a view, and the next op that needs contiguous
memory (matmul and most CPU kernels) copies it through Paddle's generic strided-copy kernel, which on CPU is slow as
soon as the leading (batch) dimension exceeds 1 (measured here, 2 cores):
- [8, 144, 16, 64] (a decode step's key cache at batch 8, made heads-first for attention): 15.5 ms against 0.7 ms
  through the transpose kernel (numpy: 0.8 ms); dynamic-graph decoding of a 2-layer glm-large shape at batch 8
  spent ~45 ms a step in these copies, 8x its batch-1 step;
- [8, 566, 16, 64] (one attention input of a pre-training batch): 86 against 12 ms; a 2-layer glm-large
  pre-training step (batch 8 x 512 tokens) 13.5-15.9 -> 12.1-13.8 s.
Values are unchanged (a copy is a copy). Accelerators keep Paddle's default: their strided copy is a device kernel.
"""
from __future__ import annotations

__all__ = ["contiguous_views"]


def contiguous_views(device: str = "cpu") -> bool:
    """On CPU, turn Paddle's stride kernels off (FLAGS_use_stride_kernel, a process setting); True when applied."""
    import paddle

    if not device.startswith("cpu"):
        return False
    paddle.set_flags({"FLAGS_use_stride_kernel": False})
    return True
