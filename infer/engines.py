"""C++ engines that run the exported step graph with its K/V cache kept in the engine's own memory.

Every engine exposes the same calls (`infer.stepper.ExportedStepper` drives the first three):
- `buffer(shape, head=None)`: a cache buffer [rows, kv_heads, slots, head_dim] of the export's dtype on the
  engine's device, zero-filled (slots not yet written must hold finite numbers: masked scores still multiply
  them) but for `head` [rows or 1, kv_heads, P, head_dim] in its first P slots (a prefix; once per batch);
- `run(feeds, cache) -> logits`: one call of the graph; `feeds` are the small numpy inputs (input_ids,
  position_ids, attention_mask, cache_index, logit_index), `cache` the buffers in the graph's order
  (`cache_input_names`). The graph writes the new tokens' keys and values into the `key_i` / `value_i` buffers;
  logits [M, V] of the positions `logit_index` [M] come back;
- `gather(buffers, index)`: the buffers' rows in `index` order (beam search), computed by the engine.
- `concat(first, second)`, `write_slots(buffers, slots, start)`, `resize(buffers, at, delta)`,
  `columns(buffers, start, stop)`: a server's batch gaining rows, folding its rows' own slots into their shared
  segment, widening or narrowing that segment, and taking each prompt's slots out of a pass that packed several
  (`infer.scheduler`); each returns the buffers to use from then on.

How each engine keeps the cache where it is (measured in bench/bench_infer.py):
- Paddle Inference: buffers are `paddle.Tensor`s shared with the graph's inputs (`share_external_data`);
  `set_value_with_tensor_` writes the new slots into them in place (no copy of anything). Beam reordering is
  `paddle.index_select` on the buffers (on the engine's device).
- ONNX Runtime: buffers are `OrtValue`s (on CPU they wrap numpy memory) bound with I/O binding as the graph's
  inputs and also as the outputs that hold the written slots, so ScatterElements writes in place. Beam reordering
  runs a small Gather graph with I/O binding.
- FastDeploy 1.0.7 (ONNX Runtime 1.12 backend): inputs are bound without a copy (`bind_input_tensor`), but its ORT
  backend allocates every output itself (`bind_output_tensor` is not honoured), so the written slots come back in
  a new buffer and are copied into ours: one copy per step of the decoding rows' own slots (the shared prompt
  segment, the large one, is never copied). Reordering is numpy on those host buffers.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

import numpy as np

__all__ = ["PaddleInferenceEngine", "OnnxRuntimeEngine", "FastDeployEngine", "create_engine", "resize_axis",
           "BACKENDS"]

BACKENDS = ("paddle", "onnxruntime", "fastdeploy")
Feeds = Dict[str, np.ndarray]
FEED_NAMES = ("input_ids", "position_ids", "attention_mask", "cache_index", "logit_index")


def _written(names: List[str]) -> List[int]:
    """Positions (in the cache inputs) of the buffers the graph writes: every layer's key and value."""
    return [i for i, name in enumerate(names) if name.startswith(("key_", "value_"))]


class PaddleInferenceEngine:
    """A Paddle Inference predictor over the PIR graph (`step.json` + `step.pdiparams`)."""

    def __init__(self, export_dir: str, graph: str, dtype: str, device: str = "cpu",
                 cpu_threads: Optional[int] = None):
        import paddle
        import paddle.inference as inference

        prefix = os.path.join(export_dir, graph)
        config = inference.Config(prefix + ".json", prefix + ".pdiparams")
        if device == "gpu":
            config.enable_use_gpu(256, 0)
            paddle.set_device("gpu")  # buffers live where the predictor reads them
        else:
            config.disable_gpu()
            # oneDNN fails on the cache writes and slices (`onednn_op.slice ... dnnl::error`).
            config.disable_mkldnn()
            if cpu_threads:
                config.set_cpu_math_library_num_threads(cpu_threads)
        config.disable_glog_info()
        self.paddle, self.dtype = paddle, dtype
        # Any dynamic-graph op (a buffer's allocation, a beam gather) sets the math library back to Paddle's
        # FLAGS_paddle_num_threads (1) for the thread: each run sets the runner's count again.
        self.threads = cpu_threads if device != "gpu" else None
        self.predictor = inference.create_predictor(config)
        names = self.predictor.get_input_names()
        self.feeds = [self.predictor.get_input_handle(name) for name in names[:len(FEED_NAMES)]]
        self.cache = [self.predictor.get_input_handle(name) for name in names[len(FEED_NAMES):]]
        self.logits = self.predictor.get_output_handle(self.predictor.get_output_names()[0])

    def buffer(self, shape: List[int], head: Optional[np.ndarray] = None):
        buffer = self.paddle.zeros(shape, dtype=self.dtype)
        if head is not None:
            buffer[:, :, :head.shape[2]] = self.paddle.to_tensor(head).astype(self.dtype)
        return buffer

    def run(self, feeds: Feeds, cache: list) -> np.ndarray:
        for handle, name in zip(self.feeds, FEED_NAMES):
            handle.copy_from_cpu(feeds[name])  # the small inputs; no dynamic-graph op
        for handle, buffer in zip(self.cache, cache):
            handle.share_external_data(buffer)  # the graph reads and writes the buffer itself
        if self.threads:
            self.paddle.base.core.set_num_threads(self.threads)
        self.predictor.run()
        return self.logits.copy_to_cpu()

    def gather(self, buffers: list, index: np.ndarray) -> list:
        index = self.paddle.to_tensor(index, dtype="int64")
        return [self.paddle.index_select(buffer, index, axis=0) for buffer in buffers]

    def concat(self, first: list, second: list) -> list:
        """Buffers pairwise concatenated along rows (a server's batch gaining rows)."""
        return [self.paddle.concat([a, b], axis=0) for a, b in zip(first, second)]

    def write_slots(self, buffers: list, slots: list, start: int) -> list:
        """`slots` [N, kv, n, hd] written into `buffers` at slots [start, start + n), in place."""
        for buffer, written in zip(buffers, slots):
            buffer[:, :, start:start + written.shape[2]] = written
        return buffers

    def resize(self, buffers: list, at: int, delta: int) -> list:
        """Buffers with `delta` zero slots inserted at slot `at` (or the -delta slots before `at` removed)."""
        paddle = self.paddle
        if delta >= 0:
            return [paddle.concat([buffer[:, :, :at], paddle.zeros([*buffer.shape[:2], delta, buffer.shape[3]],
                                                                   buffer.dtype), buffer[:, :, at:]], axis=2)
                    for buffer in buffers]
        return [paddle.concat([buffer[:, :, :at + delta], buffer[:, :, at:]], axis=2) for buffer in buffers]

    def columns(self, buffers: list, start: int, stop: int) -> list:
        """Each buffer's slots [start, stop)."""
        return [buffer[:, :, start:stop] for buffer in buffers]


class OnnxRuntimeEngine:
    """An ONNX Runtime session over `step.onnx` (export with --onnx), driven through I/O binding."""

    def __init__(self, export_dir: str, graph: str, dtype: str, device: str = "cpu",
                 cpu_threads: Optional[int] = None):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # paddle2onnx leaves unused initialisers; ORT warns about each
        if cpu_threads:
            options.intra_op_num_threads = cpu_threads
        self.device = "cuda" if device == "gpu" else "cpu"
        providers = ["CUDAExecutionProvider"] if device == "gpu" else ["CPUExecutionProvider"]
        self.ort = onnxruntime
        self.session = onnxruntime.InferenceSession(_onnx_file(export_dir, graph), options, providers=providers)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.written = _written(self.inputs[len(FEED_NAMES):])
        self.dtype = np.dtype(dtype)
        self._gathers: Dict[int, object] = {}

    def buffer(self, shape: List[int], head: Optional[np.ndarray] = None):
        # On CPU the OrtValue wraps this array's memory (and keeps it alive); on a GPU it is copied there once.
        return self.ort.OrtValue.ortvalue_from_numpy(_host_buffer(shape, self.dtype, head), self.device, 0)

    def run(self, feeds: Feeds, cache: list) -> np.ndarray:
        binding = self.session.io_binding()
        for name in FEED_NAMES:
            binding.bind_cpu_input(name, feeds[name])
        for name, buffer in zip(self.inputs[len(FEED_NAMES):], cache):
            binding.bind_ortvalue_input(name, buffer)
        binding.bind_output(self.outputs[0], "cpu")
        for output, position in zip(self.outputs[1:], self.written):  # written slots: into the buffers themselves
            binding.bind_ortvalue_output(output, cache[position])
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def gather(self, buffers: list, index: np.ndarray) -> list:
        session = self._gather_session(len(buffers))
        binding = session.io_binding()
        binding.bind_cpu_input("index", np.ascontiguousarray(index, dtype=np.int64))
        for i, buffer in enumerate(buffers):
            binding.bind_ortvalue_input(f"x{i}", buffer)
            binding.bind_output(f"y{i}", self.device)
        session.run_with_iobinding(binding)
        return binding.get_outputs()

    # A server's batch changes rows only between steps (a request joins or folds its slots): these copy through
    # host memory, which costs a copy of the buffers at those moments, never per step.
    def concat(self, first: list, second: list) -> list:
        return [self.ort.OrtValue.ortvalue_from_numpy(np.concatenate([a.numpy(), b.numpy()]), self.device, 0)
                for a, b in zip(first, second)]

    def write_slots(self, buffers: list, slots: list, start: int) -> list:
        written = []
        for buffer, new in zip(buffers, slots):
            host, new = buffer.numpy(), new.numpy()  # on CPU `host` is a view of the buffer itself, on a GPU a copy
            host[:, :, start:start + new.shape[2]] = new
            written.append(buffer if self.device == "cpu" else
                           self.ort.OrtValue.ortvalue_from_numpy(host, self.device, 0))
        return written

    def resize(self, buffers: list, at: int, delta: int) -> list:
        return [self.ort.OrtValue.ortvalue_from_numpy(resize_axis(buffer.numpy(), at, delta, 2), self.device, 0)
                for buffer in buffers]

    def columns(self, buffers: list, start: int, stop: int) -> list:
        return [self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(buffer.numpy()[:, :, start:stop]),
                                                      self.device, 0) for buffer in buffers]

    def _gather_session(self, count: int):
        """A graph of `count` Gathers along rows, built once per buffer count."""
        if count not in self._gathers:
            from onnx import TensorProto, helper

            element = helper.np_dtype_to_tensor_dtype(self.dtype)
            nodes = [helper.make_node("Gather", [f"x{i}", "index"], [f"y{i}"], axis=0) for i in range(count)]
            graph = helper.make_graph(
                nodes, "gather_rows",
                [helper.make_tensor_value_info("index", TensorProto.INT64, [None])]
                + [helper.make_tensor_value_info(f"x{i}", element, None) for i in range(count)],
                [helper.make_tensor_value_info(f"y{i}", element, None) for i in range(count)])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
            # One thread that never spins: a second session's pool spinning after each gather takes the cores from
            # the step graph's threads (on 2 cores the next step ran ~25 ms slower; bench/bench_infer.py, 5 beams).
            options = self.ort.SessionOptions()
            options.intra_op_num_threads = options.inter_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self._gathers[count] = self.ort.InferenceSession(model.SerializeToString(), options,
                                                             providers=self.session.get_providers())
        return self._gathers[count]


class FastDeployEngine:
    """FastDeploy 1.0.7 Runtime with its ONNX Runtime backend over `step.onnx` (Python <= 3.10 only).

    Its Paddle backend cannot read Paddle 3's PIR graphs, so FastDeploy always runs the ONNX export. Buffers are
    host numpy arrays bound without a copy; see the module docstring for the one copy per step it needs.
    """

    def __init__(self, export_dir: str, graph: str, dtype: str, device: str = "cpu",
                 cpu_threads: Optional[int] = None):
        import fastdeploy

        if device == "gpu":
            raise ValueError("--backend fastdeploy serves on CPU here: its ONNX Runtime backend binds host buffers")
        option = fastdeploy.RuntimeOption()
        option.set_model_path(_onnx_file(export_dir, graph), "", fastdeploy.ModelFormat.ONNX)
        option.use_ort_backend()
        option.use_cpu()
        if cpu_threads:
            option.set_cpu_thread_num(cpu_threads)
        self.fastdeploy = fastdeploy
        self.runtime = fastdeploy.Runtime(option)
        self.inputs = [self.runtime.get_input_info(i).name for i in range(self.runtime.num_inputs())]
        self.outputs = [self.runtime.get_output_info(i).name for i in range(self.runtime.num_outputs())]
        self.written = _written(self.inputs[len(FEED_NAMES):])
        self.dtype = np.dtype(dtype)

    def buffer(self, shape: List[int], head: Optional[np.ndarray] = None) -> np.ndarray:
        return _host_buffer(shape, self.dtype, head)

    def run(self, feeds: Feeds, cache: list) -> np.ndarray:
        tensors = []  # alive until the run is over: the runtime reads their memory
        for name, array in list(zip(FEED_NAMES, (feeds[n] for n in FEED_NAMES))) + list(
                zip(self.inputs[len(FEED_NAMES):], cache)):
            tensor = self.fastdeploy.C.FDTensor()
            tensor.from_numpy(array, True)  # shares the array's memory
            self.runtime.bind_input_tensor(name, tensor)
            tensors.append(tensor)
        self.runtime.zero_copy_infer()
        for output, position in zip(self.outputs[1:], self.written):
            np.copyto(cache[position], self.runtime.get_output_tensor(output).numpy())
        return self.runtime.get_output_tensor(self.outputs[0]).numpy()

    def gather(self, buffers: list, index: np.ndarray) -> list:
        return [buffer[index] for buffer in buffers]

    def concat(self, first: list, second: list) -> list:
        return [np.concatenate([a, b]) for a, b in zip(first, second)]

    def write_slots(self, buffers: list, slots: list, start: int) -> list:
        for buffer, written in zip(buffers, slots):
            buffer[:, :, start:start + written.shape[2]] = written
        return buffers

    def resize(self, buffers: list, at: int, delta: int) -> list:
        return [resize_axis(buffer, at, delta, 2) for buffer in buffers]

    def columns(self, buffers: list, start: int, stop: int) -> list:
        return [buffer[:, :, start:stop] for buffer in buffers]


def resize_axis(array: np.ndarray, at: int, delta: int, axis: int) -> np.ndarray:
    """`array` with `delta` zeros inserted at index `at` of `axis` (or the -delta entries before `at` removed)."""
    before = np.take(array, np.arange(at + min(delta, 0)), axis=axis)
    after = np.take(array, np.arange(at, array.shape[axis]), axis=axis)
    shape = list(array.shape)
    shape[axis] = max(delta, 0)
    return np.concatenate([before, np.zeros(shape, array.dtype), after], axis=axis)


def _host_buffer(shape: List[int], dtype: np.dtype, head: Optional[np.ndarray]) -> np.ndarray:
    buffer = np.zeros(shape, dtype)
    if head is not None:
        buffer[:, :, :head.shape[2]] = head
    return buffer


def _onnx_file(export_dir: str, stem: str) -> str:
    path = os.path.join(export_dir, stem + ".onnx")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: export with --onnx for the onnxruntime and fastdeploy backends")
    return path


_ENGINES = {"paddle": PaddleInferenceEngine, "onnxruntime": OnnxRuntimeEngine, "fastdeploy": FastDeployEngine}


def create_engine(backend: str, export_dir: str, graph: str, dtype: str, device: str, cpu_threads: Optional[int]):
    if backend not in _ENGINES:
        raise ValueError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    return _ENGINES[backend](export_dir, graph, dtype, device, cpu_threads)
