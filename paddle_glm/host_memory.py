"""Host memory of CPU runs: freed blocks are kept for the next step instead of being handed back to the system.

glibc serves every allocation above its mmap threshold (128 KiB at first, 32 MiB at most as it adapts) with a fresh
`mmap` and unmaps it on `free`. Paddle's CPU allocator passes large tensors straight to `malloc`, so each of a CPU
training step's large tensors (the attention scores of a batch of eight 566-token glm-large-shaped samples: 165 MB,
several per layer, forward and backward) is page-faulted and zeroed by the kernel again on every use: one
elementwise multiply of that size took 160 ms and 80k page faults against 54 ms and none on reused memory, and a
2-layer glm-large-shaped pre-training step spent a sixth of its CPU time in the kernel. Raising the mmap and trim
thresholds (`mallopt`) keeps freed blocks in the heap for reuse; the process then holds on to its peak footprint,
which a training or evaluation loop reaches again at every step anyway.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 2 ** 31 - 1  # the largest value glibc takes: blocks up to 2 GiB come from the heap, kept when freed


def keep_freed_memory(device: str = "cpu") -> bool:
    """On CPU under glibc: serve large allocations from the heap and keep freed ones; True when applied. A no-op on
    accelerators (their memory has Paddle's own caching allocator) and on other C libraries."""
    if not device.startswith("cpu") or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _THRESHOLD))
