"""C++ engines that run the exported prefill and decode graphs: feeds in, numpy arrays out.

Every engine exposes `run(graph, feeds) -> (logits, cache)` with `graph` in ("prefill", "decode")
and numpy feeds named as the export names them (input_ids, position_ids, attention_mask, cache).
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import numpy as np

__all__ = ["PaddleInferenceEngine", "create_engine", "BACKENDS"]

BACKENDS = ("paddle", "onnxruntime", "fastdeploy")
Feeds = Dict[str, np.ndarray]


class PaddleInferenceEngine:
    """Paddle Inference predictors over the PIR graphs (`NAME.json` + `NAME.pdiparams`)."""

    def __init__(self, export_dir: str, graph_files: Dict[str, str], device: str = "cpu",
                 cpu_threads: Optional[int] = None):
        import paddle.inference as inference

        self.predictors = {}
        for graph, stem in graph_files.items():
            prefix = os.path.join(export_dir, stem)
            config = inference.Config(prefix + ".json", prefix + ".pdiparams")
            if device == "gpu":
                config.enable_use_gpu(256, 0)
            else:
                config.disable_gpu()
                # oneDNN fails on the cache slices of the decode graph (`onednn_op.slice ... dnnl::error`).
                config.disable_mkldnn()
                if cpu_threads:
                    config.set_cpu_math_library_num_threads(cpu_threads)
            config.disable_glog_info()
            self.predictors[graph] = inference.create_predictor(config)

    def run(self, graph: str, feeds: Feeds) -> Tuple[np.ndarray, np.ndarray]:
        predictor = self.predictors[graph]
        for name in predictor.get_input_names():
            predictor.get_input_handle(name).copy_from_cpu(np.ascontiguousarray(feeds[name]))
        predictor.run()
        logits, cache = (predictor.get_output_handle(name).copy_to_cpu() for name in predictor.get_output_names())
        return logits, cache


def create_engine(backend: str, export_dir: str, graph_files: Dict[str, str], device: str,
                  cpu_threads: Optional[int]):
    if backend == "paddle":
        return PaddleInferenceEngine(export_dir, graph_files, device, cpu_threads)
    raise ValueError(f"--backend {backend!r} is not available in this build: choose paddle")
