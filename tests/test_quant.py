"""Weight-only int8/int4 exports: ONNX Runtime's MatMulNBits serves them on CPU close to fp32; the backends that
cannot serve them say so; Paddle's weight_only_linear layers carry the scales Paddle's quantizer defines."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import paddle
import pytest

from export.exporter import main as export_main
from export.quantize import WeightOnlyLinear, weight_only_paddle
from infer.runner import GLMRunner, main as infer_main
from paddle_glm.args import InputError
from paddle_glm.data import read_pairs
from paddle_glm.decoding import DecodingConfig
from paddle_glm.models.glm import GLMConfig, GLMForConditionalGeneration
from tasks import get_task


@pytest.fixture(scope="module")
def quantized(demo_trained, demo_base, tmp_path_factory):
    """The trained demo GLM exported three ways: {"float32" | quant: export directory}."""
    root = tmp_path_factory.mktemp("quant")
    directories = {}
    for quant in ("float32", "weight_only_int8", "weight_only_int4"):
        directories[quant] = str(root / quant)
        export_main(["--model_name_or_path", demo_trained, "--output_path", directories[quant], "--tgt_length", "12"]
                    + (["--onnx"] if quant == "float32" else ["--quant", quant]))
    return directories


def _sources(demo_base, count=20):
    task = get_task("dureader_qg")
    pairs = []
    for split in ("dev", "train"):  # the 6 dev questions, then training ones (the first 48 lines are QG)
        pairs += read_pairs(demo_base["qg"][split], lambda record, where: task.to_pairs(record, where, None),
                            limit=count)
    return [source for source, _ in pairs[:count]]


def _greedy(directory, sources):
    runner = GLMRunner(directory, backend="onnxruntime", cpu_threads=1)
    template = runner.template()
    config = DecodingConfig(eos_token_id=template.stop_ids, pad_token_id=template.pad_id, max_length=12,
                            tokenizer_size=template.tokenizer_size)
    prompts = [template.generation_example(template.prompt_ids(s, (), 48)[0]) for s in sources]
    return runner.generate(prompts, config).sequences


def _matmul_nbits(directory):
    model = onnx.load(os.path.join(directory, "step.onnx"))
    return [{a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            for node in model.graph.node if node.op_type == "MatMulNBits"]


@pytest.mark.parametrize("quant, bits", [("weight_only_int8", 8), ("weight_only_int4", 4)])
def test_quantized_export_is_onnx_with_matmul_nbits(quantized, quant, bits):
    directory = quantized[quant]
    files = set(os.listdir(directory))
    assert "step.onnx" in files and not {"step.json", "step.pdiparams"} & files  # no CPU Paddle kernel serves it
    config = json.load(open(os.path.join(directory, "export_config.json")))
    assert config["quant"] == quant and config["paddle_graph"] is False
    nodes = _matmul_nbits(directory)
    # 2 layers x (qkv, dense, h->4h, 4h->h) and the tied output projection
    assert len(nodes) == 2 * 4 + 1 and {(n["bits"], n["block_size"]) for n in nodes} == {(bits, 128)}
    fp32 = os.path.getsize(os.path.join(quantized["float32"], "step.onnx"))
    assert os.path.getsize(os.path.join(directory, "step.onnx")) < fp32  # the embedding table stays float32


def test_int8_greedy_outputs_match_fp32(quantized, demo_base):
    sources = _sources(demo_base)
    fp32 = _greedy(quantized["float32"], sources)
    int8 = _greedy(quantized["weight_only_int8"], sources)
    int4 = _greedy(quantized["weight_only_int4"], sources)
    assert np.mean([a == b for a, b in zip(int8, fp32)]) >= 0.9
    assert any(len(s) > 0 for s in int4) and len(int4) == len(fp32)  # int4 serves; its quality is bench_infer's


def test_infer_generation_serves_a_quantized_export_with_onnxruntime(quantized, demo_base, tmp_path):
    source = _sources(demo_base, 1)[0]

    def predict(directory):
        output = tmp_path / "out.json"
        infer_main(["--model_path", directory, "--backend", "onnxruntime", "--text", source,
                    "--output_file", str(output), "--cpu_threads", "1"])
        return [json.loads(line)["prediction"] for line in open(output, encoding="utf-8")]

    assert predict(quantized["weight_only_int8"]) == predict(quantized["float32"])


def test_backends_without_weight_only_kernels_refuse_quantized_exports(quantized):
    directory = quantized["weight_only_int8"]
    with pytest.raises(InputError, match="without a Paddle graph.*--backend onnxruntime"):
        GLMRunner(directory, backend="paddle")
    with pytest.raises(InputError, match="predates MatMulNBits.*--backend onnxruntime"):
        GLMRunner(directory, backend="fastdeploy")
    with pytest.raises(InputError, match="without a Paddle graph"):
        infer_main(["--model_path", directory, "--text", "x"])  # --backend paddle by default


def test_export_refuses_unknown_methods_and_half_precision_on_cpu(demo_base, tmp_path):
    with pytest.raises(ValueError, match="--quant weight_only_int3: use weight_only_int8 or weight_only_int4"):
        export_main(["--model_name_or_path", demo_base["model"], "--output_path", str(tmp_path / "a"),
                     "--quant", "weight_only_int3"])
    with pytest.raises(ValueError, match="--quant weight_only_int8 on this CPU build writes step.onnx only"):
        export_main(["--model_name_or_path", demo_base["model"], "--output_path", str(tmp_path / "b"),
                     "--quant", "weight_only_int8", "--dtype", "bfloat16"])


@pytest.mark.parametrize("quant, levels, group", [("weight_only_int8", 127, None), ("weight_only_int4", 7, 128)])
def test_weight_only_paddle_replaces_every_linear_with_its_scales(quant, levels, group):
    """What a CUDA build's export puts in the Paddle graph (the op itself has no CPU kernel): every nn.Linear
    quantized, the scales max |w| / levels per output channel (int8) or per 128 inputs of one (int4)."""
    paddle.seed(0)
    model = GLMForConditionalGeneration(GLMConfig(num_layers=2, vocab_size=96, hidden_size=128, num_attention_heads=4,
                                                  max_sequence_length=64, output_predict=True))
    model.to(dtype="bfloat16")
    weights = {name: layer.weight.astype("float32").numpy() for name, layer in model.named_sublayers()
               if isinstance(layer, paddle.nn.Linear)}
    assert weight_only_paddle(model, quant, arch=80) == len(weights) == 8
    layers = dict(model.named_sublayers())
    for name, weight in weights.items():  # [in, out]
        layer = layers[name]
        assert isinstance(layer, WeightOnlyLinear) and layer.weight.dtype == paddle.int8
        rows = weight.shape[1] if quant == "weight_only_int8" else weight.shape[1] // 2  # int4: two per byte
        assert layer.weight.shape == [rows, weight.shape[0]]
        blocks = weight[None] if group is None else weight.reshape(-1, group, weight.shape[1])  # (groups, g, out)
        expected = np.abs(blocks).max(axis=1) / levels  # (groups, out)
        scale = layer.weight_scale.astype("float32").numpy().reshape(expected.shape)
        np.testing.assert_allclose(scale, expected, rtol=1e-2)
    with pytest.raises(ValueError, match="float16 or bfloat16 weights"):
        WeightOnlyLinear(paddle.nn.Linear(128, 128), quant, 80)
