"""export_generation_model.py's flags: --src_length is the export's source limit and the runner's default, --dtype
writes weights of that dtype or, where this Paddle cannot trace it, is refused before anything is written."""
from __future__ import annotations

import json
import os

import paddle
import pytest

from export.exporter import main as export_main
from infer.runner import main as infer_main
from paddle_glm.decoding import DecodingConfig
from paddle_glm.generation import generate
from paddle_glm.models import load_model, load_template

LONG = "答案：巴黎，上下文：巴黎是法国的首都，位于欧洲，人口约210万，是欧洲最大的城市之一。"


def _export(demo_base, output_path, *flags):
    export_main(["--model_name_or_path", demo_base["model"], "--output_path", str(output_path), "--tgt_length", "6",
                 *flags])
    return json.load(open(os.path.join(output_path, "export_config.json")))


def test_src_length_limits_the_export_and_cuts_the_sources_it_serves(demo_base, tmp_path):
    """Exported with --src_length 20, the runner cuts a longer source to 20 tokens (its end dropped) and serves what
    the dygraph model generates from that cut prompt, not from the whole one; more is refused."""
    assert _export(demo_base, tmp_path / "export", "--src_length", "20")["src_length"] == 20
    output = tmp_path / "out.json"
    infer_main(["--model_path", str(tmp_path / "export"), "--text", LONG, "--decode_strategy", "greedy_search",
                "--no_repeat_ngram_size", "0", "--output_file", str(output)])
    (served,) = [json.loads(line)["prediction"] for line in open(output, encoding="utf-8")]

    template = load_template(demo_base["model"])
    config = DecodingConfig(decode_strategy="greedy_search", no_repeat_ngram_size=0, max_length=6,
                            eos_token_id=template.stop_ids, pad_token_id=template.pad_id,
                            tokenizer_size=template.tokenizer_size)
    model = load_model(demo_base["model"])

    def greedy(src_length):
        ids, cut = template.prompt_ids(LONG, (), src_length)
        return cut, template.response(generate(model, [template.generation_example(ids)], config).sequences[0])

    assert greedy(20) == (True, served)
    cut, whole = greedy(64)
    assert not cut and whole != served
    with pytest.raises(ValueError, match="--src_length 21 exceeds the export's 20"):
        infer_main(["--model_path", str(tmp_path / "export"), "--text", LONG, "--src_length", "21"])
    with pytest.raises(ValueError, match=r"--src_length 251 \+ --tgt_length 6 must fit the model's 256 positions"):
        _export(demo_base, tmp_path / "too_long", "--src_length", "251")
    assert not os.path.exists(tmp_path / "too_long")


def test_dtype_bfloat16_writes_the_weights_rounded_to_bfloat16(demo_base, tmp_path):
    assert _export(demo_base, tmp_path / "bf16", "--dtype", "bfloat16")["dtype"] == "bfloat16"
    traced = paddle.jit.load(str(tmp_path / "bf16" / "step")).state_dict().values()
    assert {str(p.dtype) for p in traced} == {"paddle.bfloat16"}
    # The graph's parameters (renamed param_N when traced) are, tensor for tensor, the checkpoint's rounded.
    weights = paddle.load(os.path.join(demo_base["model"], "model_state.pdparams")).values()
    as_float32 = lambda tensors: sorted((tuple(t.shape), t.astype("float32").numpy().tobytes())  # noqa: E731
                                        for t in tensors)
    assert as_float32(traced) == as_float32(w.astype("bfloat16") for w in weights)
    assert as_float32(traced) != as_float32(weights)
    with pytest.raises(ValueError, match="exported in bfloat16, which serves on GPU"):
        infer_main(["--model_path", str(tmp_path / "bf16"), "--device", "cpu", "--text", "x"])


def test_dtype_float16_and_unknown_dtypes_are_refused_before_anything_is_written(demo_base, tmp_path):
    """A CPU build of Paddle has no float16 kernels to trace the graph with (tracing fails inside the model), so
    --dtype float16 is refused up front there; a CUDA build writes float16 weights."""
    if paddle.is_compiled_with_cuda():
        assert _export(demo_base, tmp_path / "fp16", "--dtype", "float16")["dtype"] == "float16"
        traced = paddle.jit.load(str(tmp_path / "fp16" / "step")).state_dict().values()
        assert {str(p.dtype) for p in traced} == {"paddle.float16"}
    else:
        with pytest.raises(ValueError, match="--dtype float16 needs a GPU build of Paddle to trace"):
            _export(demo_base, tmp_path / "fp16", "--dtype", "float16")
        assert not os.path.exists(tmp_path / "fp16")
    with pytest.raises(ValueError, match="--dtype int8: use float32, float16 or bfloat16"):
        _export(demo_base, tmp_path / "int8", "--dtype", "int8")
    assert not os.path.exists(tmp_path / "int8")
