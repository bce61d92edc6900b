"""The paddle2onnx step graph made ready for ONNX Runtime: weights as initializers, one copy of the tied output
projection, and (`--quant`) weight-only int8/int4 MatMulNBits.

paddle2onnx writes every weight as a Constant node behind Identity nodes, and the tied output projection as
MatMul(hidden, Transpose(word_embeddings)). ONNX Runtime folds that Transpose at load time into a second, transposed
copy of the embeddings (205 MB on glm-large's 50048 x 1024), so here the projection becomes FusedMatMul with
transB (one copy, read in place). ONNX Runtime's MatMulNBits quantizer (`onnxruntime.quantization`) only takes
MatMul nodes whose weight is an initializer: it quantizes every linear layer and the projection (given its own
transposed initializer, which quantization replaces by the int8/int4 blocks); the embedding lookup keeps the
float32 table (it reads one row per token).
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from paddle_glm.args import InputError

__all__ = ["finish_onnx", "QUANT_BITS", "GROUP_SIZE"]

QUANT_BITS = {"weight_only_int8": 8, "weight_only_int4": 4}
GROUP_SIZE = 128  # one scale per 128 inputs of an output channel
ACCURACY_LEVEL = 4  # MatMulNBits computes with int8 activations (see _quantize)


def finish_onnx(onnx_file: str, quant: Optional[str] = None) -> None:
    """Rewrite `onnx_file` in place (see the module docstring)."""
    import onnx

    model = onnx.load(onnx_file)
    _constants_to_initializers(model)
    _bypass_identities(model)
    _tied_projection(model, transpose_weight=quant is not None)
    if quant:
        model = _quantize(model, quant)
    onnx.save(model, onnx_file)


def _constants_to_initializers(model) -> None:
    from onnx import numpy_helper

    graph = model.graph
    kept = []
    for node in graph.node:
        value = next((a for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and value is not None and len(node.attribute) == 1:
            graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(value.t), node.output[0]))
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def _bypass_identities(model) -> None:
    """Consumers of Identity(x) read x (Identities that name a graph output stay)."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    alias: Dict[str, str] = {}
    kept = []
    for node in graph.node:
        if node.op_type == "Identity" and node.output[0] not in outputs:
            alias[node.output[0]] = alias.get(node.input[0], node.input[0])
        else:
            kept.append(node)
    for node in kept:
        for i, name in enumerate(node.input):
            node.input[i] = alias.get(name, name)
    del graph.node[:]
    graph.node.extend(kept)


def _tied_projection(model, transpose_weight: bool) -> None:
    """MatMul(x, Transpose(W)) over an initializer W: FusedMatMul(x, W, transB=1), or, for quantization,
    MatMul(x, W^T) with W^T an initializer of its own."""
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    producer = {output: node for node in graph.node for output in node.output}
    consumers: Dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    rewritten, dropped = [], set()
    for node in graph.node:
        source = producer.get(node.input[1]) if node.op_type == "MatMul" else None
        if (source is None or source.op_type != "Transpose" or source.input[0] not in initializers
                or list(helper.get_attribute_value(source.attribute[0])) != [1, 0] or consumers[source.output[0]] > 1):
            rewritten.append(node)
            continue
        weight, dropped = source.input[0], dropped | {id(source)}
        if transpose_weight:
            transposed = np.ascontiguousarray(numpy_helper.to_array(initializers[weight]).T)
            graph.initializer.append(numpy_helper.from_array(transposed, weight + ".T"))
            rewritten.append(helper.make_node("MatMul", [node.input[0], weight + ".T"], node.output, name=node.name))
        else:
            rewritten.append(helper.make_node("FusedMatMul", [node.input[0], weight], node.output, name=node.name,
                                              domain="com.microsoft", transB=1, alpha=1.0))
    del graph.node[:]
    graph.node.extend(n for n in rewritten if id(n) not in dropped)
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _quantize(model, quant: str):
    """Every MatMul over an initializer as MatMulNBits: symmetric, one float32 scale per group of 128 inputs of an
    output channel, for int8 as for int4 (MatMulNBits takes groups of 16 to 256 only, so int8 cannot be one scale
    per whole channel as Paddle's weight_only_int8 is; groups of 128 cost 3% more bytes and lose less).

    Accuracy level 4: the kernel multiplies int8 weights by activations it quantizes to int8 per group on the fly
    (VNNI/AMX dot products). Only the weights are stored quantized; at the default level (float32 compute) ONNX
    Runtime 1.32 has no fast int8 kernel on CPU (15x slower than float32 on glm-large's shape, bench_infer.py),
    and on the demo's dev set level 4 loses no more (see README)."""
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as error:  # onnxruntime.quantization imports ml_dtypes, which onnxruntime does not require
        raise InputError(f"--quant {quant} needs ONNX Runtime's quantization tools ({error}): "
                         "pip install -e '.[onnx]'") from None

    quantizer = MatMulNBitsQuantizer(model, bits=QUANT_BITS[quant], block_size=GROUP_SIZE, is_symmetric=True,
                                     accuracy_level=ACCURACY_LEVEL)
    quantizer.process()
    return quantizer.model.model

