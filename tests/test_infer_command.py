"""infer_generation.py as a command (`infer.runner.main`): each flag changes what is served, or how, as an
independent computation says it should: `GLMRunner.generate` or the dygraph `generate` on the same weights with the
settings the flag names, the engine's own configuration for the engine flags."""
from __future__ import annotations

import json
import os
import shutil

import onnxruntime
import paddle
import paddle.inference
import pytest

from export.exporter import main as export_main
from infer.runner import GLMRunner, main as infer_main
from paddle_glm.data import write_json_lines
from paddle_glm.decoding import DecodingConfig
from paddle_glm.generation import generate
from paddle_glm.models import load_template
from test_infer import _paddlenlp_lora_model
from test_predict import DECODING_CASES, DEFAULTS, TEXTS, _predictions, _texts

MORE_TEXTS = TEXTS + ["答案：北京，上下文：北京是中国的首都。", "上下文：从南京到武汉约500公里"]
GREEDY = ["--decode_strategy", "greedy_search", "--no_repeat_ngram_size", "0", "--tgt_length", "6",
          "--src_length", "48"]


def _serve(tmp_path, *flags, name="out.json"):
    """The records `infer_generation.py FLAGS --output_file ...` writes."""
    output = tmp_path / name
    infer_main([str(f) for f in flags] + ["--output_file", str(output)])
    return [json.loads(line) for line in open(output, encoding="utf-8")]


def _greedy(template, texts):
    """The prompts of `texts` and the settings GREEDY names, built directly rather than from flags."""
    config = DecodingConfig(decode_strategy="greedy_search", no_repeat_ngram_size=0, max_length=6,
                            eos_token_id=template.stop_ids, pad_token_id=template.pad_id,
                            tokenizer_size=template.tokenizer_size)
    return [template.generation_example(template.prompt_ids(text, (), 48)[0]) for text in texts], config


def _greedy_reference(export_dir, texts):
    """What GREEDY serves, as `GLMRunner.generate` decodes it."""
    template = load_template(export_dir)
    sequences = GLMRunner(export_dir, backend="paddle", device="cpu").generate(*_greedy(template, texts)).sequences
    return [template.response(ids) for ids in sequences]


def test_backend_flag_chooses_the_engine_and_refuses_an_unknown_one(exported, tmp_path):
    """An export with only step.onnx: --backend onnxruntime serves it, and serves what the dygraph LoRA model
    generates; left to its default (paddle) the runner asks for the Paddle graph it lacks."""
    onnx_only = shutil.copytree(exported["dir"], tmp_path / "onnx_only")
    for name in ("step.json", "step.pdiparams"):
        os.remove(onnx_only / name)
    served = _serve(tmp_path, "--model_path", onnx_only, "--backend", "onnxruntime", *GREEDY, *_texts(*TEXTS))
    template = load_template(exported["dir"])
    dygraph = generate(_paddlenlp_lora_model(exported), *_greedy(template, TEXTS)).sequences
    assert [r["prediction"] for r in served] == [template.response(ids) for ids in dygraph]
    with pytest.raises(FileNotFoundError, match=r"step\.json, .*step\.pdiparams not found.*--backend paddle"):
        _serve(tmp_path, "--model_path", onnx_only, *GREEDY, *_texts(*TEXTS))
    with pytest.raises(ValueError, match="--backend tensorrt: choose one of paddle, onnxruntime, fastdeploy"):
        _serve(tmp_path, "--model_path", exported["dir"], "--backend", "tensorrt", *_texts(*TEXTS))


@pytest.fixture
def paddle_configs(monkeypatch):
    """Every `paddle.inference.Config` the engines create, kept to read back what the flags set on it (`gpu`:
    whether GPU use was asked for, which a CPU build ignores)."""
    created = []

    class Recorded(paddle.inference.Config):
        def __init__(self, *args):
            super().__init__(*args)
            self.gpu = False
            created.append(self)

        def enable_use_gpu(self, *args):
            self.gpu = True
            super().enable_use_gpu(*args)

    monkeypatch.setattr(paddle.inference, "Config", Recorded)
    return created


@pytest.fixture
def ort_sessions(monkeypatch):
    """(session options, providers) of every ONNX Runtime session the engines create."""
    created = []
    session = onnxruntime.InferenceSession

    def recorded(path, options=None, providers=None, **kwargs):
        created.append((options, providers))
        return session(path, options, providers=providers, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", recorded)
    return created


def test_device_and_cpu_threads_configure_the_engine(exported, tmp_path, paddle_configs, ort_sessions):
    expected = _greedy_reference(exported["dir"], TEXTS)
    flags = ["--model_path", exported["dir"], *GREEDY, *_texts(*TEXTS)]
    del paddle_configs[:]
    served = _serve(tmp_path, *flags, "--device", "cpu", "--cpu_threads", "3")
    assert [r["prediction"] for r in served] == expected
    (config,) = paddle_configs
    assert not config.gpu and config.cpu_math_library_num_threads() == 3
    _serve(tmp_path, *flags, "--backend", "onnxruntime", "--cpu_threads", "2")
    assert [(options.intra_op_num_threads, providers) for options, providers in ort_sessions] == [
        (2, ["CPUExecutionProvider"])]
    cuda = paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    _serve(tmp_path, *flags)  # the default device: gpu where there is one, else cpu with the library's threads
    assert paddle_configs[1].gpu == cuda and (cuda or paddle_configs[1].cpu_math_library_num_threads() == 1)
    if not cuda:  # --device gpu reaches the engine, which asks for the GPU; a CPU build of Paddle then refuses it
        with pytest.raises(ValueError, match="not compiled with CUDA"):
            _serve(tmp_path, *flags, "--device", "gpu")
        assert len(paddle_configs) == 3 and paddle_configs[2].gpu


def test_model_prefix_names_the_export_under_model_path(exported, tmp_path):
    parent, prefix = os.path.split(exported["dir"])
    served = _serve(tmp_path, "--model_path", parent, "--model_prefix", prefix, *GREEDY, *_texts(*TEXTS))
    assert [r["prediction"] for r in served] == _greedy_reference(exported["dir"], TEXTS)


def test_batch_size_sets_the_prompts_decoded_together(exported, tmp_path, monkeypatch):
    batches = []
    decode = GLMRunner.generate

    def recorded(runner, prompts, decoding):
        batches.append(len(prompts))
        return decode(runner, prompts, decoding)

    monkeypatch.setattr(GLMRunner, "generate", recorded)
    flags = ["--model_path", exported["dir"], *GREEDY, *_texts(*MORE_TEXTS)]
    two = _serve(tmp_path, *flags, "--batch_size", "2")
    assert batches == [2, 2, 1]
    default = _serve(tmp_path, *flags)
    assert batches[3:] == [5]  # --batch_size 8
    assert [r["prediction"] for r in two] == [r["prediction"] for r in default]
    monkeypatch.setattr(GLMRunner, "generate", decode)
    assert [r["prediction"] for r in two] == _greedy_reference(exported["dir"], MORE_TEXTS)


def test_source_field_names_the_text_of_input_records(exported, tmp_path):
    records = [{"id": i, "question": text} for i, text in enumerate(TEXTS)]
    write_json_lines(records, str(tmp_path / "in.json"))
    flags = ["--model_path", exported["dir"], *GREEDY, "--input_file", tmp_path / "in.json"]
    served = _serve(tmp_path, *flags, "--source_field", "question")
    expected = _greedy_reference(exported["dir"], TEXTS)
    assert served == [{**record, "prediction": p} for record, p in zip(records, expected)]
    default = _serve(tmp_path, *flags)  # --source_field src: every record lacks it
    assert [r["error"] for r in default] == [f"{tmp_path / 'in.json'}:{n}: missing field 'src'" for n in (1, 2, 3)]


@pytest.fixture(scope="module")
def trained_export(demo_trained, tmp_path_factory):
    """The fine-tuned demo GLM (it ends its answers, so length and penalty flags change them) exported."""
    export_dir = str(tmp_path_factory.mktemp("trained_export") / "export")
    export_main(["--model_name_or_path", demo_trained, "--output_path", export_dir, "--tgt_length", "12"])
    return export_dir


@pytest.mark.parametrize("flags,fields", DECODING_CASES,
                         ids=["greedy, no repeat, min length", "greedy, repetition penalty", "sampling", "beam search"])
def test_decoding_flags_reach_the_served_generation(trained_export, decoded, tmp_path, flags, fields):
    """The runner serves what the dygraph `generate` gives the same weights with the settings the flags name
    (--min_tgt_length, --num_return_sequences, the sampling and penalty flags), and each flag matters: with any one
    left at its default, `generate` gives something else."""
    served = _serve(tmp_path, "--model_path", trained_export, "--tgt_length", "8", "--num_beams", "2",
                    "--src_length", "48", "--batch_size", "3", *_texts(*TEXTS), *flags)
    expected = decoded(TEXTS, **{**DEFAULTS, **fields})
    assert _predictions(served) == expected
    for name in fields:
        if name not in ("decode_strategy", "num_beams"):  # these two are what the others need
            assert decoded(TEXTS, **{**DEFAULTS, **fields, name: DEFAULTS[name]}) != expected, name
