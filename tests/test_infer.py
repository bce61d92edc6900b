"""Exported graphs run by the C++ runner give the same tokens as the dynamic-graph model."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from paddlenlp.peft import LoRAModel

from export.exporter import main as export_main
from infer.runner import GLMRunner, main as infer_main
from paddle_glm.decoding import DecodingConfig
from paddle_glm.generation import generate
from paddle_glm.models import load_model, load_template

TEXTS = ["答案：巴黎，上下文：巴黎是法国的首都，位于欧洲，人口约210万。", "答案：长江", "答案：1998年，上下文：云海公司于1998年推出了手表。",
         "上下文：从南京到武汉约500公里"]


def _prompts(template, texts=TEXTS, src_length=64):
    return [template.generation_example(template.prompt_ids(t, (), src_length)[0]) for t in texts]


def test_export_writes_graphs_tokenizer_and_config(exported):
    files = set(os.listdir(exported["dir"]))
    assert {"step.json", "step.pdiparams", "step.onnx", "export_config.json"} <= files
    assert "tokenizer_config.json" in files
    config = json.load(open(os.path.join(exported["dir"], "export_config.json")))
    template = load_template(exported["dir"])
    tokenizer = template.tokenizer
    assert config["format_version"] == 4 and config["dtype"] == "float32" and config["family"] == "glm"
    assert config["graph"] == "step" and config["quant"] is None and config["prefix_tokens"] == 0
    assert (config["tgt_length"], config["src_length"]) == (12, 256 - 12)
    assert config["special_ids"]["eop"] == tokenizer.eop_token_id and config["tokenizer_size"] == len(tokenizer)
    assert config["special_ids"]["stop"] == [tokenizer.eop_token_id] and config["kv_heads"] == 4


def _paddlenlp_lora_model(exported):
    """The exported base model with its adapter applied by PaddleNLP's own LoRAModel (merged in eval mode), not by
    the merge the exporter uses."""
    model = LoRAModel.from_pretrained(load_model(exported["base"]), exported["adapter"])
    model.eval()
    return model


@pytest.mark.parametrize("settings", [
    dict(decode_strategy="greedy_search"),
    dict(decode_strategy="beam_search", num_beams=3, length_penalty=0.7, num_return_sequences=2),
    dict(decode_strategy="beam_search", num_beams=4, no_repeat_ngram_size=2, min_length=3),
    dict(decode_strategy="sampling", top_k=5, top_p=0.9, temperature=0.8, seed=3),
])
def test_paddle_inference_runner_equals_dygraph_generate(exported, settings):
    template = load_template(exported["dir"])
    config = DecodingConfig(eos_token_id=template.stop_ids, pad_token_id=template.pad_id, max_length=12,
                            tokenizer_size=template.tokenizer_size, **settings)
    prompts = _prompts(template)
    assert len({len(p["input_ids"]) for p in prompts}) == len(prompts)  # all lengths differ
    dygraph = generate(_paddlenlp_lora_model(exported), prompts, config)
    runner = GLMRunner(exported["dir"], backend="paddle", device="cpu", cpu_threads=1)
    served = runner.generate(prompts, config)
    assert served.sequences == dygraph.sequences
    assert served.sequences != generate(load_model(exported["base"]), prompts, config).sequences  # the adapter acts
    np.testing.assert_allclose(served.scores, dygraph.scores, rtol=1e-4, atol=1e-5)


def test_onnxruntime_runner_agrees_with_paddle_inference(exported):
    """paddle2onnx would turn tanh-GELU into exact GELU (~1e-3 apart); the export spells it out, so the
    engines agree to float rounding: logits within 1e-4, and the same tokens."""
    template = load_template(exported["dir"])
    prompts = _prompts(template)
    paddle_runner = GLMRunner(exported["dir"], backend="paddle")
    onnx_runner = GLMRunner(exported["dir"], backend="onnxruntime")
    greedy = DecodingConfig(eos_token_id=template.stop_ids, pad_token_id=template.pad_id, max_length=12)
    steppers = [runner.stepper(prompts, greedy) for runner in (paddle_runner, onnx_runner)]
    paddle_logits, onnx_logits = (stepper.prefill(1) for stepper in steppers)
    assert np.abs(paddle_logits - onnx_logits).max() <= 1e-4
    for paddle_cache, onnx_cache in zip(*(stepper.shared for stepper in steppers)):  # the prompts' keys and values
        assert np.abs(paddle_cache.numpy() - onnx_cache.numpy()).max() <= 1e-4
    for settings in (dict(decode_strategy="greedy_search"), dict(decode_strategy="beam_search", num_beams=3)):
        config = DecodingConfig(eos_token_id=template.stop_ids, pad_token_id=template.pad_id,
                                max_length=12, tokenizer_size=template.tokenizer_size, **settings)
        assert onnx_runner.generate(prompts, config).sequences == paddle_runner.generate(prompts, config).sequences


def test_onnxruntime_beam_reordering_gathers_rows_on_one_quiet_thread(exported):
    """Rows come back in `index` order; the gather session runs on the caller's thread without spinning: a second
    thread pool spinning after each reorder took the cores from the step graph (5-beam steps ~1.7x slower on 2
    cores, bench/bench_infer.py)."""
    runner = GLMRunner(exported["dir"], backend="onnxruntime", cpu_threads=2)
    engine = runner.engine
    arrays = [np.random.default_rng(i).random((4, 2, 3, 5), dtype=np.float32) for i in range(3)]
    index = np.array([2, 2, 0, 3])
    gathered = engine.gather([engine.buffer(list(a.shape), a) for a in arrays], index)
    for array, rows in zip(arrays, gathered):
        np.testing.assert_array_equal(rows.numpy(), array[index])
    session = engine._gather_session(len(arrays))
    assert session.get_session_options().intra_op_num_threads == 1
    assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_decoding_settings_are_chosen_at_run_time(exported, tmp_path):
    def run(*flags):
        output = tmp_path / "out.json"
        infer_main(["--model_path", exported["dir"], "--output_file", str(output), "--tgt_length", "10",
                    "--text", TEXTS[0], "--text", TEXTS[2]] + list(flags))
        return [json.loads(line)["prediction"] for line in open(output, encoding="utf-8")]

    greedy = run("--decode_strategy", "greedy_search")
    beams = run("--decode_strategy", "beam_search", "--num_beams", "4", "--no_repeat_ngram_size", "0")
    short = run("--decode_strategy", "greedy_search", "--tgt_length", "2")
    assert greedy != beams
    # --tgt_length counts tokens: the 2 that generate gives at max_length 2 (the random model never stops early)
    template = load_template(exported["dir"])
    config = DecodingConfig(eos_token_id=template.stop_ids, pad_token_id=template.pad_id, max_length=2,
                            no_repeat_ngram_size=3, tokenizer_size=template.tokenizer_size)
    expected = generate(_paddlenlp_lora_model(exported), _prompts(template, [TEXTS[0], TEXTS[2]]), config).sequences
    assert [len(ids) for ids in expected] == [2, 2] and short == [template.response(ids) for ids in expected]


def test_runner_refuses_sources_longer_than_the_export(exported):
    with pytest.raises(ValueError, match="--src_length 250 exceeds the export's 244"):
        infer_main(["--model_path", exported["dir"], "--text", "x", "--src_length", "250", "--tgt_length", "4"])
    with pytest.raises(ValueError, match="--tgt_length 13 exceeds the export's 12"):
        infer_main(["--model_path", exported["dir"], "--text", "x", "--tgt_length", "13"])
    with pytest.raises(FileNotFoundError, match="export_config.json not found"):
        GLMRunner(os.path.dirname(exported["dir"]))


def test_bfloat16_export_writes_half_size_weights_and_cpu_serving_refuses_it(demo_base, tmp_path):
    export_dir = tmp_path / "bf16"
    export_main(["--model_name_or_path", demo_base["model"], "--output_path", str(export_dir), "--dtype", "bfloat16",
                 "--tgt_length", "8"])
    assert json.load(open(export_dir / "export_config.json"))["dtype"] == "bfloat16"
    fp32_size = os.path.getsize(os.path.join(demo_base["root"], "base", "model_state.pdparams"))
    assert os.path.getsize(export_dir / "step.pdiparams") < 0.6 * fp32_size
    with pytest.raises(ValueError, match="exported in bfloat16, which serves on GPU"):
        infer_main(["--model_path", str(export_dir), "--text", "x"])
