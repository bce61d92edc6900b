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


class OnnxRuntimeEngine:
    """ONNX Runtime sessions over `NAME.onnx` (export with --onnx)."""

    def __init__(self, export_dir: str, graph_files: Dict[str, str], device: str = "cpu",
                 cpu_threads: Optional[int] = None):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # paddle2onnx leaves unused initialisers; ORT warns about each
        if cpu_threads:
            options.intra_op_num_threads = cpu_threads
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "gpu" else ["CPUExecutionProvider"]
        self.sessions = {
            graph: onnxruntime.InferenceSession(_onnx_file(export_dir, stem), options, providers=providers)
            for graph, stem in graph_files.items()
        }

    def run(self, graph: str, feeds: Feeds) -> Tuple[np.ndarray, np.ndarray]:
        session = self.sessions[graph]
        logits, cache = session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})
        return logits, cache


class FastDeployEngine:
    """FastDeploy 1.0.7 Runtime with its ONNX Runtime backend over `NAME.onnx` (Python <= 3.10 only).

    Its Paddle backend cannot read Paddle 3's PIR graphs, so FastDeploy always runs the ONNX export.
    """

    def __init__(self, export_dir: str, graph_files: Dict[str, str], device: str = "cpu",
                 cpu_threads: Optional[int] = None):
        import fastdeploy

        self.runtimes = {}
        for graph, stem in graph_files.items():
            option = fastdeploy.RuntimeOption()
            option.set_model_path(_onnx_file(export_dir, stem), "", fastdeploy.ModelFormat.ONNX)
            option.use_ort_backend()
            if device == "gpu":
                option.use_gpu(0)
            else:
                option.use_cpu()
                if cpu_threads:
                    option.set_cpu_thread_num(cpu_threads)
            self.runtimes[graph] = fastdeploy.Runtime(option)

    def run(self, graph: str, feeds: Feeds) -> Tuple[np.ndarray, np.ndarray]:
        runtime = self.runtimes[graph]
        names = [runtime.get_input_info(i).name for i in range(runtime.num_inputs())]
        logits, cache = runtime.infer({name: np.ascontiguousarray(feeds[name]) for name in names})
        return logits, cache


def _onnx_file(export_dir: str, stem: str) -> str:
    path = os.path.join(export_dir, stem + ".onnx")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: export with --onnx for the onnxruntime and fastdeploy backends")
    return path


_ENGINES = {"paddle": PaddleInferenceEngine, "onnxruntime": OnnxRuntimeEngine, "fastdeploy": FastDeployEngine}


def create_engine(backend: str, export_dir: str, graph_files: Dict[str, str], device: str,
                  cpu_threads: Optional[int]):
    if backend not in _ENGINES:
        raise ValueError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    return _ENGINES[backend](export_dir, graph_files, device, cpu_threads)
