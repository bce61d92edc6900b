"""What the entry points set on CPU (`paddle_glm.args.set_device`) besides freed memory (tests/test_host_memory.py):
transposes copied by Paddle's transpose kernel instead of left as strided views (values unchanged), every core the
process may use for predicting and scoring, and the output projection of a few decoding rows computed rows first."""
import os
import subprocess
import sys

import numpy as np
import paddle

from paddle_glm import args
from paddle_glm.models import layers
from paddle_glm.strided_views import contiguous_views

# A fresh process per setting: FLAGS_use_stride_kernel is process-wide.
PROBE = """
import sys
import numpy as np
import paddle
sys.path.insert(0, "tests")
from conftest import tiny_config
from paddle_glm.models.glm import GLMForConditionalGeneration
from paddle_glm.strided_views import contiguous_views
paddle.set_device("cpu")
if sys.argv[1] == "copies":
    assert contiguous_views("cpu")
x = paddle.randn([4, 6, 3, 5])
rng = np.random.default_rng(2)
ids = paddle.to_tensor(rng.integers(0, 96, (3, 12)))
labels = paddle.to_tensor(rng.integers(0, 96, (3, 12)))
paddle.seed(4)
model = GLMForConditionalGeneration(tiny_config())
output = model(ids, labels=labels)
output.loss.backward()
arrays = {name: p.grad.numpy() for name, p in model.named_parameters()}
arrays["logits"] = output.logits.numpy()
np.savez(sys.argv[2], view=np.array(x.transpose([0, 2, 1, 3]).is_contiguous()), **arrays)
"""


def probe(mode: str, path: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, mode, path], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-2000:]
    return dict(np.load(path))


def test_transposes_become_copies_and_a_model_computes_the_same(tmp_path):
    views, copies = probe("views", str(tmp_path / "views.npz")), probe("copies", str(tmp_path / "copies.npz"))
    assert not views.pop("view") and copies.pop("view")  # Paddle's default returns a strided view
    assert views.keys() == copies.keys() and len(views) > 10
    for name in views:
        np.testing.assert_array_equal(views[name], copies[name], err_msg=name)


def test_accelerators_keep_strided_views():
    assert contiguous_views("gpu:0") is False


def test_predicting_entry_points_take_every_core(monkeypatch):
    calls = []
    monkeypatch.setattr(paddle.base.core, "set_num_threads", calls.append)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("PADDLE_LOCAL_SIZE", raising=False)
    args.set_device("cpu")
    assert calls == []  # training keeps Paddle's default thread count
    args.set_device("cpu", all_cores=True)
    monkeypatch.setenv("PADDLE_LOCAL_SIZE", "2")  # two processes of a launch on this machine share its cores
    args.set_device("cpu", all_cores=True)
    monkeypatch.setenv("PADDLE_LOCAL_SIZE", "16")
    args.set_device("cpu", all_cores=True)
    assert calls == [8, 4, 1]


def test_few_decoding_rows_project_rows_first(monkeypatch):
    from conftest import tiny_config

    weight = paddle.randn([96, 32])
    model = type("Model", (), {"config": tiny_config()})()
    shapes = []
    matmul = paddle.matmul
    monkeypatch.setattr(paddle, "matmul", lambda x, y, **kw: shapes.append(x.shape) or matmul(x, y, **kw))
    for rows in (1, 3, 4, 8, 256, 257):
        hidden = paddle.randn([rows, 1, 32])
        logits, _ = layers.lm_head(model, hidden, weight, None, None, 0.0)
        expected = hidden.numpy() @ weight.numpy().T
        np.testing.assert_allclose(logits.numpy(), expected, rtol=1e-5, atol=1e-5)
        assert logits.shape == [rows, 1, 96]
    # (W h^T)^T for 4-256 rows: the weight comes first
    assert [shape[0] == 96 for shape in shapes] == [False, False, True, True, True, False]
    labels = paddle.zeros([8, 1], dtype="int64")  # with labels (training) the product keeps its usual form
    layers.lm_head(model, paddle.randn([8, 1, 32]), weight, labels, None, 0.0)
    assert shapes[-1] == [8, 1, 32]
