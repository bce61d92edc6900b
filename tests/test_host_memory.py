"""`keep_freed_memory`: a large tensor allocated again after being freed reuses memory instead of page-faulting it in
anew (glibc's default unmaps every block above its mmap threshold on free)."""
import subprocess
import sys

import pytest

from paddle_glm.host_memory import keep_freed_memory

# A fresh process each time: the setting is process-wide, and this one's heap already holds other tests' blocks.
PROBE = """
import resource, sys
import paddle
from paddle_glm.host_memory import keep_freed_memory
paddle.set_device("cpu")
if sys.argv[1] == "keep":
    assert keep_freed_memory(paddle.get_device())
x = paddle.ones([64, 1024, 1024])  # 256 MiB
for _ in range(8):  # the last products reuse the first ones' memory if it was kept (the heap settles in 4 or 5)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = x * 2.0
    float(y[0, 0, 0])
    del y
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not keep_freed_memory("cpu"), reason="needs glibc's mallopt")
def test_a_freed_large_tensor_is_reused_without_page_faults():
    assert page_faults("default") > 30000  # 256 MiB of 4 KiB pages faulted in again: what the setting removes
    assert page_faults("keep") < 3000


def test_accelerators_are_left_alone():
    assert keep_freed_memory("gpu:0") is False
