"""A checkpoint served in dynamic graph (`serve_generation.py --model_name_or_path CKPT`) through the same batch and
stepper code as an export: an "engine" whose `run` is the exported graph's forward (`export.exporter.StepGraph`) in
dynamic graph, with paddle tensors as the cache buffers (`models.layers.attend_cached` writes them in place)."""
from __future__ import annotations

from typing import Optional

import numpy as np
import paddle

from export.exporter import StepGraph
from paddle_glm.args import cpu_cores, set_device
from paddle_glm.models import family_of, load_model

from .engines import FEED_NAMES, PaddleInferenceEngine
from .runner import GLMRunner

__all__ = ["DygraphEngine", "DygraphRunner"]


class DygraphEngine(PaddleInferenceEngine):
    """Paddle tensors as buffers (buffer, gather, concat, write_slots as Paddle Inference's); `run` in eager mode.
    No predictor is built: the parent's constructor is not called. On CPU each run sets the math library's thread
    count for its thread (a server runs the model in its scheduler's thread): every core (`args.cpu_cores`)."""

    def __init__(self, graph: StepGraph, dtype: str):
        self.paddle, self.dtype, self.graph = paddle, dtype, graph
        self.threads = cpu_cores() if paddle.get_device().startswith("cpu") else None

    def run(self, feeds, cache: list) -> np.ndarray:
        if self.threads:
            paddle.base.core.set_num_threads(self.threads)
        with paddle.no_grad():
            inputs = [paddle.to_tensor(feeds[name]) for name in FEED_NAMES]
            return self.graph(*inputs, cache)[0].numpy()


class DygraphRunner(GLMRunner):
    """`GLMRunner` over a checkpoint: an export's config made from the model's, its tokenizer (`template`) read
    from the checkpoint; the parent's constructor (which reads an export) is not called."""

    def __init__(self, model_name_or_path: str, device: str = "cpu", tgt_length: int = 64,
                 src_length: Optional[int] = None):
        set_device(device)
        model = load_model(model_name_or_path)
        model.eval()
        family = family_of(model.config)
        positions = family.max_positions(model.config)
        layers = family.num_layers(model.config)
        src_length = src_length or positions - tgt_length
        if src_length < 1 or src_length + tgt_length > positions:
            raise ValueError(f"--src_length {src_length} + --tgt_length {tgt_length} must fit the model's {positions} "
                             "positions")
        self.export_dir, self.prefix = model_name_or_path, None
        self.config = {"family": family.name, "num_layers": layers, "kv_heads": family.kv_heads(model.config),
                       "head_dim": family.head_dim(model.config), "tgt_length": tgt_length,
                       "src_length": src_length, "prefix_tokens": 0,
                       "dtype": str(model.parameters()[0].dtype).split(".")[-1]}
        self.engine = DygraphEngine(StepGraph(model, layers), self.config["dtype"])
