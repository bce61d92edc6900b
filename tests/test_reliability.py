"""Reliability: bad input gets a clear answer (file, line, field or flag), nothing is lost, resume is exact.

- every bad data line names `file:line` and the field; `--skip_invalid_examples` counts and lists what it skips;
- impossible flags are refused before any work, naming the flag; a script run ends with `error: ...`, status 2;
- batch prediction gives a bad input line an `error` record and keeps every other prediction;
- checkpoints are written to `tmp-checkpoint-N` and renamed when complete: an interrupted save is never taken
  for a checkpoint, and a run killed with SIGKILL (before or right after a middle checkpoint, after the last one;
  inside an epoch or on its boundary) and run again ends with the uninterrupted run's step count, losses and
  bit-identical weights.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import paddle
import pytest
from paddle.io import DistributedBatchSampler
from paddlenlp.peft import LoRAConfig, LoRAModel
from paddlenlp.trainer import get_last_checkpoint

import paddle_glm.data as data_module
from paddle_glm.data import DataError, read_json_lines, read_pairs, summarize_skipped, tokenize_pairs
from paddle_glm.finetune import main as finetune_main
from paddle_glm.models import load_template
from paddle_glm.models.glm import GLMForConditionalGeneration
from paddle_glm.predict import main as predict_main
from paddle_glm.trainer import StepLimitedBatchSampler
from tasks import belle, dureader_qg

from conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = {"context": "北京是中国的首都，有很多名胜古迹。", "answer": "北京", "question": "中国的首都是哪里？"}


def record(**changes) -> str:
    """A DuReaderQG line with fields changed (None: a JSON null) or, listed in `drop`, removed."""
    values = dict(GOOD)
    for name in changes.pop("drop", ()):
        del values[name]
    values.update(changes)
    return json.dumps(values, ensure_ascii=False) + "\n"


def write(tmp_path, *lines, name="data.json") -> str:
    path = tmp_path / name
    path.write_bytes(b"".join(line if isinstance(line, bytes) else line.encode("utf-8") for line in lines))
    return str(path)


def flags(base, output_dir, **overrides):
    values = {
        "model_name_or_path": base["model"], "train_file": base["qg"]["train"], "dev_file": base["qg"]["dev"],
        "output_dir": str(output_dir), "src_length": 64, "tgt_length": 12, "min_tgt_length": 0, "num_beams": 2,
        "max_steps": 2, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4, "learning_rate": 1e-3,
        "do_train": True, "do_eval": False, "save_strategy": "no", "logging_steps": 1, "report_to": "none",
        "device": "cpu", "seed": 3, "disable_tqdm": True, "max_train_samples": 24, "max_eval_samples": 4,
    }
    values.update(overrides)
    argv = []
    for key, value in values.items():
        if value is not None:
            argv += [f"--{key}", str(value)]
    return argv


def messages(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------- bad data files

GBK_LINE = json.dumps({"context": "北京", "answer": "北京", "question": "哪里"}, ensure_ascii=False).encode("gbk") + b"\n"

DATA_CASES = [
    ("invalid JSON", [record(), '{"context": "c", "answer": "a", "question": }\n'], "{path}:2: invalid JSON"),
    ("JSON document", ["[\n", record()],
     "{path}:1: invalid JSON (Expecting value at column 1): expected one JSON object per line, not one JSON document"),
    ("not an object", [record(), '["a", "b"]\n'], "{path}:2: expected a JSON object per line, got list"),
    ("missing field", [record(), record(drop=["question"])], "{path}:2: missing field 'question' (or target)"),
    ("empty field", [record(), record(), record(question="  ")], "{path}:3: field 'question' is empty"),
    ("number", [record(answer=5)], "{path}:1: field 'answer' must be a string, got int"),
    ("null", [record(context=None)], "{path}:1: field 'context' must be a string, got NoneType"),
    ("not UTF-8 (GBK)", [record(), GBK_LINE], "{path}:2: not UTF-8 text (invalid start byte at byte 13): save the file as UTF-8"),
    ("UTF-16 with BOM", [record().encode("utf-16")], "{path}: the file is UTF-16 or UTF-32"),
    ("blank lines keep numbers", ["\n", record(), "  \n", "\r\n", record(drop=["answer"])], "{path}:5: missing field 'answer'"),
    ("enormous line", [record(), record(context="长" * 2000), record()], "{path}:2: line longer than 1000 bytes, not read"),
    ("empty file", [], "{path}: the file has no examples"),
    ("only blank lines", ["\n", "   \n"], "{path}: the file has no examples"),
    ("missing file", None, "{path}: no such data file"),
]


@pytest.mark.parametrize("lines,expected", [case[1:] for case in DATA_CASES], ids=[case[0] for case in DATA_CASES])
def test_bad_data_names_file_line_and_field(tmp_path, monkeypatch, lines, expected):
    monkeypatch.setattr(data_module, "MAX_LINE_BYTES", 1000)
    path = str(tmp_path / "missing.json") if lines is None else write(tmp_path, *lines)
    with pytest.raises(DataError) as error:
        read_pairs(path, dureader_qg.to_pairs)
    assert expected.format(path=path) in str(error.value)


def test_task_record_errors_name_the_nested_field(tmp_path):
    path = write(tmp_path, json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]}) + "\n")
    with pytest.raises(DataError, match=r"data\.json:1: conversations\[1\]: missing field 'value'"):
        read_pairs(path, belle.to_pairs)


def test_byte_order_marks_and_long_lines_under_the_limit_are_read(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "MAX_LINE_BYTES", 1000)
    fits = record(context="长" * 100)  # ~400 bytes
    path = write(tmp_path, b"\xef\xbb\xbf" + record().encode(), b"\xef\xbb\xbf" + fits.encode())  # files concatenated
    assert [where for where, _ in read_json_lines(path)] == [f"{path}:1", f"{path}:2"]


def test_skip_mode_counts_and_lists_what_it_skips(tmp_path):
    path = write(tmp_path, record(), "not json\n", record(drop=["question"]), "\n", record(answer=""), GBK_LINE, record())
    skipped = []
    pairs = read_pairs(path, dureader_qg.to_pairs, skipped=skipped)
    assert len(pairs) == 2
    assert skipped == [
        {"file": path, "line": 2, "reason": "invalid JSON (Expecting value at column 1)"},
        {"file": path, "line": 3, "reason": "missing field 'question' (or target)"},
        {"file": path, "line": 5, "reason": "field 'answer' is empty"},
        {"file": path, "line": 6, "reason": "not UTF-8 text (invalid start byte at byte 13): save the file as UTF-8"},
    ]
    assert summarize_skipped(skipped) == ("1 invalid JSON, 1 missing field 'question', 1 field 'answer' is empty, "
                                          "1 not UTF-8 text: save the file as UTF-8")
    with pytest.raises(DataError, match="no valid examples: all 2 lines skipped"):
        read_pairs(write(tmp_path, "x\n", record(answer=3), name="bad.json"), dureader_qg.to_pairs, skipped=[])


def test_skip_invalid_examples_flag_logs_the_count_and_writes_the_list(demo_base, tmp_path, paddlenlp_log):
    good = open(demo_base["qg"]["train"], encoding="utf-8").read().splitlines(keepends=True)[:8]
    train = write(tmp_path, *good[:3], "{oops\n", *good[3:6], record(question=7), *good[6:], name="train.json")
    finetune_main(flags(demo_base, tmp_path / "out", train_file=train, skip_invalid_examples=True))
    listed = [json.loads(line) for line in open(tmp_path / "out" / "skipped_examples.jsonl", encoding="utf-8")]
    assert listed == [
        {"file": train, "line": 4, "reason": "invalid JSON (Expecting property name enclosed in double quotes at column 2)"},
        {"file": train, "line": 8, "reason": "field 'question' must be a string, got int"},
    ]
    assert "train: skipped 2 invalid lines of" in messages(paddlenlp_log)
    assert "1 invalid JSON, 1 field 'question' must be a string, got int" in messages(paddlenlp_log)
    assert "train: 8 examples" in messages(paddlenlp_log)
    with pytest.raises(DataError, match="train.json:4: invalid JSON"):  # without the flag: stop at the first
        finetune_main(flags(demo_base, tmp_path / "out2", train_file=train))


def test_over_long_sources_and_targets_are_truncated_with_a_count(demo_base, paddlenlp_log):
    template = load_template(demo_base["model"])
    pairs = [("答案：北京，上下文：" + "北京是中国的首都。" * 30, "中国的首都是哪里？" * 5), ("答案：北京", "哪里？")]
    data = tokenize_pairs(pairs, template, src_length=16, tgt_length=6)
    assert int(data[0]["attention_mask"]) == 16 and len(data[0]["input_ids"]) == 16 + 6
    assert ("truncated 1 of 2 sources to --src_length 16 (dialogue history first, then the end of the text) and 1 "
            "targets to --tgt_length 6") in messages(paddlenlp_log)


# ------------------------------------------------------------------------------------- impossible flags


def _adapter(tmp_path, model, name, target=".*query_key_value.*") -> str:
    LoRAModel(model, LoRAConfig(target_modules=[target], r=4, lora_alpha=8)).save_pretrained(str(tmp_path / name))
    return str(tmp_path / name)


FLAG_CASES = [
    ("num_beams 0", dict(num_beams=0), "--num_beams 0: must be at least 1"),
    ("num_beams 1 with beam search", dict(num_beams=1, decode_strategy="beam_search"),
     "--num_beams 1: beam_search needs at least 2 beams (for one, use --decode_strategy greedy_search)"),
    ("decode_strategy", dict(decode_strategy="nucleus"), "--decode_strategy nucleus: choose one of"),
    ("top_p above 1", dict(top_p=1.5), "--top_p 1.5: must lie in [0, 1]"),
    ("top_p negative", dict(top_p=-0.1), "--top_p -0.1: must lie in [0, 1]"),
    ("temperature 0", dict(temperature=0), "--temperature 0.0: must be > 0"),
    ("negative no_repeat_ngram_size", dict(no_repeat_ngram_size=-1), "--no_repeat_ngram_size -1: must be >= 0"),
    ("negative min_tgt_length", dict(min_tgt_length=-1), "--min_tgt_length -1: must be >= 0"),
    ("num_return_sequences", dict(num_return_sequences=3), "--num_return_sequences 3 exceeds --num_beams 2"),
    ("tgt_length beyond positions", dict(tgt_length=300), "--tgt_length 300 exceeds the model's 256 positions"),
    ("src + tgt beyond positions", dict(src_length=200, tgt_length=100),
     "--src_length 200 + --tgt_length 100 exceeds the model's 256 positions"),
    ("tensor_parallel_degree", dict(tensor_parallel_degree=3),
     "--tensor_parallel_degree 3 does not divide the model's 4 attention heads: use one of 1, 2, 4"),
    ("task_name", dict(task_name="nope"), "--task_name 'nope' is not a known task"),
    ("lora_path without --lora", dict(lora_path="ADAPTERS/other"), "--lora_path ADAPTERS/other needs --lora"),
    ("lora_path not an adapter", dict(lora=True, lora_path="MODEL"), "--lora_path MODEL: no lora_config.json"),
    ("lora_path missing", dict(lora=True, lora_path="ADAPTERS/none"), "--lora_path ADAPTERS/none: no such directory"),
    ("lora_path of another model", dict(lora=True, lora_path="ADAPTERS/other"),
     "--lora_path ADAPTERS/other does not fit the model (an adapter of another model?): "
     "glm.transformer.layers.0.attention.query_key_value.lora_A has shape [32, 4] but the model needs [128, 4]"),
    ("lora_path targets nothing", dict(lora=True, lora_path="ADAPTERS/elsewhere"),
     "--lora_path ADAPTERS/elsewhere: its target_modules ['.*no_such_layer.*'] match no linear layer"),
    ("lora_path split for 2 ranks", dict(lora=True, lora_path="ADAPTERS/sharded"),
     "--lora_path ADAPTERS/sharded holds an adapter split for 2 tensor-parallel ranks but the model runs on 1"),
    ("resume_from_checkpoint", dict(resume_from_checkpoint="ADAPTERS/none"),
     "--resume_from_checkpoint ADAPTERS/none: not a checkpoint"),
]


@pytest.fixture(scope="module")
def adapters(demo_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    _adapter(root, GLMForConditionalGeneration(tiny_config()), "other")  # hidden 32, not the demo's 128
    elsewhere = _adapter(root, GLMForConditionalGeneration.from_pretrained(demo_base["model"]), "elsewhere")
    config_file = os.path.join(elsewhere, "lora_config.json")
    config = json.load(open(config_file))
    json.dump({**config, "target_modules": [".*no_such_layer.*"]}, open(config_file, "w"))
    sharded = _adapter(root, GLMForConditionalGeneration.from_pretrained(demo_base["model"]), "sharded")
    config_file = os.path.join(sharded, "lora_config.json")
    json.dump({**json.load(open(config_file)), "tensor_parallel_degree": 2}, open(config_file, "w"))
    return str(root)


@pytest.mark.parametrize("overrides,expected", [case[1:] for case in FLAG_CASES], ids=[case[0] for case in FLAG_CASES])
def test_impossible_flags_are_refused_before_work_naming_the_flag(demo_base, adapters, tmp_path, overrides,
                                                                   expected):
    values = {name: value.replace("ADAPTERS", adapters).replace("MODEL", demo_base["model"]) if isinstance(value, str)
              else value for name, value in overrides.items()}
    expected = expected.replace("ADAPTERS", adapters).replace("MODEL", demo_base["model"])
    with pytest.raises(ValueError) as error:
        finetune_main(flags(demo_base, tmp_path / "out", **values))
    assert expected in str(error.value)
    assert not os.path.exists(tmp_path / "out" / "model_state.pdparams")


def test_prediction_refuses_bad_flags_and_mismatched_adapters(demo_base, adapters):
    base = ["--model_name_or_path", demo_base["model"], "--text", "答案：北京"]
    with pytest.raises(ValueError, match="--num_beams 0: must be at least 1"):
        predict_main(base + ["--num_beams", "0"])
    with pytest.raises(ValueError, match="--temperature -1.0: must be > 0"):
        predict_main(base + ["--temperature", "-1", "--decode_strategy", "sampling"])
    with pytest.raises(ValueError, match=r"lora_path .*other does not fit the model"):
        predict_main(base + ["--lora_path", os.path.join(adapters, "other")])


# ------------------------------------------------------------------------------------- script runs


def test_script_run_reports_bad_input_as_error_and_status_2(demo_base, tmp_path, monkeypatch, capsys):
    bad = write(tmp_path, record(), "{bad\n")
    cases = [
        (flags(demo_base, tmp_path / "out", train_file=bad), f"{bad}:2: invalid JSON"),
        (flags(demo_base, tmp_path / "out", num_beams=0), "--num_beams 0: must be at least 1"),
    ]
    for argv, expected in cases:
        monkeypatch.setattr(sys, "argv", ["finetune_generation.py"] + argv)
        with pytest.raises(SystemExit) as exit_info:
            finetune_main()
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err and "Traceback" not in err

    import paddle_glm.finetune

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(paddle_glm.finetune, "family_of", interrupt)  # Ctrl-C
    monkeypatch.setattr(sys, "argv", ["finetune_generation.py"] + flags(demo_base, tmp_path / "out"))
    with pytest.raises(SystemExit) as exit_info:
        finetune_main()
    assert exit_info.value.code == 130 and capsys.readouterr().err.startswith("interrupted")

    from infer.runner import main as infer_main

    monkeypatch.setattr(sys, "argv", ["infer_generation.py", "--model_path", str(tmp_path), "--text", "x"])
    with pytest.raises(SystemExit) as exit_info:
        infer_main()
    assert exit_info.value.code == 2
    assert f"error: {tmp_path}/export_config.json not found" in capsys.readouterr().err


def test_runner_names_missing_graph_files(exported, tmp_path):
    from infer.runner import GLMRunner, export_directory

    export = shutil.copytree(exported["dir"], tmp_path / "export")
    os.remove(export / "step.pdiparams")
    os.remove(export / "step.onnx")
    with pytest.raises(FileNotFoundError, match=r"step\.pdiparams not found: the export in .* is incomplete"):
        GLMRunner(str(export), backend="paddle")
    with pytest.raises(FileNotFoundError, match=r"step\.onnx not found.*with --onnx"):
        GLMRunner(str(export), backend="onnxruntime")
    with pytest.raises(FileNotFoundError, match=r"--model_prefix other: no export at .*other \(export_generation"):
        export_directory(os.path.dirname(exported["dir"]), "other")
    assert export_directory(os.path.dirname(exported["dir"]), os.path.basename(exported["dir"])) == exported["dir"]
    os.remove(export / "tokenizer_config.json")
    with pytest.raises(FileNotFoundError, match=r"step\.pdiparams, .*tokenizer_config\.json not found"):
        GLMRunner(str(export), backend="paddle")


# ------------------------------------------------------------------------------------- batch prediction

TEXTS = ["答案：巴黎，上下文：巴黎是法国的首都，位于欧洲。", "答案：长江", "答案：1998年，上下文：" + "云海公司于1998年推出了手表。" * 30]


def _input_file(tmp_path) -> str:
    line = lambda text: json.dumps({"id": text[:4], "src": text}, ensure_ascii=False) + "\n"  # noqa: E731
    return write(tmp_path, line(TEXTS[0]), '{"src": "x",}\n', "\n", line(TEXTS[1]), '{"id": 5}\n',
                 b'{"src": "\xb1\xb1\xbe\xa9"}\n', '{"src": " "}\n', '{"src": 7}\n', line(TEXTS[2]), name="in.json")


def _bad_records(path):
    return [
        {"error": f"{path}:2: invalid JSON (Expecting property name enclosed in double quotes at column 13)"},
        {"id": 5, "error": f"{path}:5: missing field 'src'"},
        {"error": f"{path}:6: not UTF-8 text (invalid start byte at byte 9): save the file as UTF-8"},
        {"src": " ", "error": f"{path}:7: field 'src' is empty"},
        {"src": 7, "error": f"{path}:8: field 'src' must be a string, got int"},
    ]


def _read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_batch_prediction_keeps_every_good_output_when_lines_are_bad(demo_base, tmp_path, paddlenlp_log):
    path = _input_file(tmp_path)
    common = ["--model_name_or_path", demo_base["model"], "--tgt_length", "6", "--num_beams", "2",
              "--src_length", "48", "--batch_size", "2"]
    predict_main(common + ["--input_file", path, "--output_file", str(tmp_path / "out.json")])
    out = _read(tmp_path / "out.json")
    assert [r.get("id") for r in out] == [TEXTS[0][:4], None, TEXTS[1][:4], 5, None, None, None, TEXTS[2][:4]]
    assert [r for r in out if "error" in r] == _bad_records(path)
    assert not any("prediction" in r for r in out if "error" in r)
    predict_main(common + [a for t in TEXTS for a in ("--text", t)] + ["--output_file", str(tmp_path / "t.json")])
    assert [r["prediction"] for r in out if "prediction" in r] == [r["prediction"] for r in _read(tmp_path / "t.json")]
    logged = messages(paddlenlp_log)
    assert "5 of 8 inputs not predicted: their output records carry 'error'" in logged
    assert f"not predicted: {path}:2: invalid JSON" in logged
    assert "truncated 1 of 3 sources to --src_length 48 tokens (their end dropped)" in logged

    predict_main(common + ["--text", TEXTS[0], "--text", "  ", "--output_file", str(tmp_path / "e.json")])
    assert _read(tmp_path / "e.json")[1] == {"src": "  ", "error": "--text 2: empty text"}


def test_runner_keeps_every_good_output_when_lines_are_bad(exported, tmp_path):
    from infer.runner import main as infer_main

    path = _input_file(tmp_path)
    infer_main(["--model_path", exported["dir"], "--input_file", path, "--output_file", str(tmp_path / "out.json"),
                "--tgt_length", "4", "--decode_strategy", "greedy_search"])
    out = _read(tmp_path / "out.json")
    assert [r.get("id") for r in out] == [TEXTS[0][:4], None, TEXTS[1][:4], 5, None, None, None, TEXTS[2][:4]]
    assert [r for r in out if "error" in r] == _bad_records(path)
    infer_main(["--model_path", exported["dir"], *[a for t in TEXTS for a in ("--text", t)], "--output_file",
                str(tmp_path / "t.json"), "--tgt_length", "4", "--decode_strategy", "greedy_search"])
    assert [r["prediction"] for r in out if "prediction" in r] == [r["prediction"] for r in _read(tmp_path / "t.json")]


# ------------------------------------------------------------------------------------- nothing lost


def _checkpoints(output_dir):
    return sorted((name for name in os.listdir(output_dir) if "checkpoint" in name), key=lambda n: (len(n), n))


def _trainer_state(output_dir):
    return json.load(open(os.path.join(output_dir, "trainer_state.json")))


def _losses(output_dir):
    """step -> logged loss; a step logged twice (trained twice) fails here rather than overwrite its first loss."""
    logged = [(entry["step"], entry["loss"]) for entry in _trainer_state(output_dir)["log_history"] if "loss" in entry]
    assert len({step for step, _ in logged}) == len(logged), f"a step logged twice in {output_dir}: {logged}"
    return dict(logged)


def _assert_same_training(expected_dir, actual_dir, steps):
    """`actual_dir` trained exactly `steps` steps with the losses and bit for bit the final weights of `expected_dir`
    (on CPU the same batches, dropout masks and optimizer states leave nothing to round differently)."""
    for directory in (expected_dir, actual_dir):
        assert _trainer_state(directory)["global_step"] == steps, directory
        assert sorted(_losses(directory)) == list(range(1, steps + 1)), directory  # --logging_steps 1
    assert _losses(actual_dir) == _losses(expected_dir)
    expected = paddle.load(os.path.join(expected_dir, "model_state.pdparams"), return_numpy=True)
    actual = paddle.load(os.path.join(actual_dir, "model_state.pdparams"), return_numpy=True)
    assert expected.keys() == actual.keys()
    differ = {key: float(np.abs(actual[key] - expected[key]).max()) for key in expected
              if not np.array_equal(actual[key], expected[key])}
    assert not differ, f"final weights differ (max |difference| per tensor): {differ}"


def _fresh_names_run(argv):
    """`finetune_main` as a new process would run it: optimizer states are keyed by parameter names, which
    Paddle numbers per process (`embedding_0.w_0`, ...)."""
    with paddle.utils.unique_name.guard():
        finetune_main(argv)


def test_interrupted_save_leaves_no_checkpoint_and_the_rerun_resumes_exactly(demo_base, tmp_path, monkeypatch):
    argv = lambda out: flags(demo_base, out, max_steps=8, save_strategy="steps", save_steps=2,  # noqa: E731
                             save_total_limit=2)
    _fresh_names_run(argv(tmp_path / "straight"))
    assert _checkpoints(tmp_path / "straight") == ["checkpoint-6", "checkpoint-8"]  # --save_total_limit in one process

    save = paddle.save

    def interrupted(obj, path, *args, **kwargs):
        if path.endswith(os.path.join("tmp-checkpoint-4", "rng_state.pth")):  # the last file of a checkpoint
            raise KeyboardInterrupt
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(paddle, "save", interrupted)
    output = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        _fresh_names_run(argv(output))
    monkeypatch.setattr(paddle, "save", save)
    assert _checkpoints(output) == ["checkpoint-2", "tmp-checkpoint-4"]
    assert os.path.isfile(output / "tmp-checkpoint-4" / "model_state.pdparams")  # written, yet not a checkpoint
    assert get_last_checkpoint(str(output)) == str(output / "checkpoint-2")

    _fresh_names_run(argv(output))  # the same command again: resumes from checkpoint-2, clears the leftover
    assert _checkpoints(output) == ["checkpoint-6", "checkpoint-8"]
    _assert_same_training(tmp_path / "straight", output, steps=8)

    # 6 steps per epoch: checkpoint-6 is an epoch boundary, where PaddleNLP never restored the RNG states (dropout).
    boundary = tmp_path / "boundary"
    shutil.copytree(tmp_path / "straight" / "checkpoint-6", boundary / "checkpoint-6")
    _fresh_names_run(argv(boundary) + ["--resume_from_checkpoint", str(boundary / "checkpoint-6")])
    _assert_same_training(tmp_path / "straight", boundary, steps=8)


def test_step_limited_sampler_ends_the_last_epoch_with_the_last_step():
    """The batches of `DistributedBatchSampler` (same shuffle), none past --max_steps' last optimizer step."""
    dataset = list(range(10))  # in batches of 2: 5 an epoch
    plain = DistributedBatchSampler(dataset, batch_size=2, shuffle=True)
    # 2 batches a step: steps 1-2 (and an odd batch) in epoch 0, 3-4 in epoch 1, step 5 = epoch 2's first 2 batches
    by_steps = StepLimitedBatchSampler(dataset, batch_size=2, shuffle=True, max_steps=5, num_train_epochs=3,
                                       accumulation=2)
    # --num_train_epochs 1.5 at 5 steps an epoch: int(7.5) = 7 steps, as PaddleNLP's Trainer counts them
    by_epochs = StepLimitedBatchSampler(dataset, batch_size=2, shuffle=True, max_steps=-1, num_train_epochs=1.5,
                                        accumulation=1)
    for sampler, batches in ((by_steps, [5, 5, 2, 0]), (by_epochs, [5, 2, 0])):
        for epoch, count in enumerate(batches):
            plain.set_epoch(epoch)
            sampler.set_epoch(epoch)
            assert list(sampler) == list(plain)[:count], (epoch, count)
        assert len(sampler) == len(plain) == 5  # the Trainer's epoch arithmetic is unchanged


# Kill-and-resume runs: 16 examples in batches of 4 are 4 steps an epoch, a checkpoint every 2 steps, so checkpoints
# 2, 6, 10 fall inside an epoch and 4, 8 on its boundary; the demo GLM has dropout 0.1. Each run is a new process.
STEPS_PER_EPOCH, SAVE_STEPS = 4, 2
# PYTHONPATH: tests/kill_worker.py runs with tests/ first on sys.path, where tests/tasks would hide the tasks package.
KILL_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}


def _kill_flags(base, output_dir, max_steps):
    return flags(base, output_dir, max_steps=max_steps, save_strategy="steps", save_steps=SAVE_STEPS,
                 max_train_samples=4 * STEPS_PER_EPOCH)


def _start(command, output_dir):
    return subprocess.Popen(command, cwd=ROOT, env=KILL_ENV, stdout=open(f"{output_dir}.log", "w"),
                            stderr=subprocess.STDOUT)


def _checkpoint_times(output_dir, after=0):
    """checkpoint-N (N > after) -> modification time of its weights file."""
    return {name: os.stat(os.path.join(output_dir, name, "model_state.pdparams")).st_mtime_ns
            for name in _checkpoints(output_dir) if name.startswith("checkpoint-") and int(name.split("-")[1]) > after}


def _finetune(base, output_dir, max_steps):
    """`python finetune_generation.py FLAGS` run to its end (the same command resumes a killed run)."""
    command = [sys.executable, os.path.join(ROOT, "finetune_generation.py")] + _kill_flags(base, output_dir, max_steps)
    assert _start(command, output_dir).wait(timeout=240) == 0, open(f"{output_dir}.log").read()[-3000:]


@pytest.fixture(scope="module")
def uninterrupted(demo_base, tmp_path_factory):
    """max_steps -> the output directory of an uninterrupted run (run once, on first use)."""
    root, runs = tmp_path_factory.mktemp("uninterrupted"), {}

    def run(max_steps):
        if max_steps not in runs:
            _finetune(demo_base, root / f"steps{max_steps}", max_steps)
            runs[max_steps] = root / f"steps{max_steps}"
        return runs[max_steps]

    return run


KILL_CASES = [  # (name, --max_steps, where the process kills itself, the checkpoint the rerun resumes from)
    ("before a middle checkpoint, resumed inside an epoch", 10, "in-step-4", 2),
    ("before a middle checkpoint, resumed at an epoch boundary", 10, "in-step-6", 4),
    ("right after a middle checkpoint inside an epoch", 10, "after-checkpoint-6", 6),
    ("right after a middle checkpoint at an epoch boundary", 10, "after-checkpoint-4", 4),
    ("after the last checkpoint, inside an epoch", 10, "after-checkpoint-10", 10),
    ("after the last checkpoint, at an epoch boundary", 8, "after-checkpoint-8", 8),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("max_steps,kill_point,resumes_from", [case[1:] for case in KILL_CASES],
                         ids=[case[0] for case in KILL_CASES])
def test_training_killed_and_rerun_ends_bit_identical_to_uninterrupted(demo_base, uninterrupted, tmp_path, max_steps,
                                                                       kill_point, resumes_from):
    """The process SIGKILLs itself at an exact step (tests/kill_worker.py); the same command run again resumes from
    the last checkpoint and ends as the uninterrupted run: same step count, losses, and weights bit for bit. From
    the final checkpoint the rerun trains nothing and still writes the final model."""
    killed = tmp_path / "killed"
    victim = _start([sys.executable, os.path.join(ROOT, "tests", "kill_worker.py"), kill_point]
                    + _kill_flags(demo_base, killed, max_steps), killed)
    assert victim.wait(timeout=240) == -signal.SIGKILL, open(f"{killed}.log").read()[-3000:]
    assert not os.path.exists(killed / "model_state.pdparams")  # the final model is saved after the last checkpoint
    assert get_last_checkpoint(str(killed)) == str(killed / f"checkpoint-{resumes_from}")
    written = _checkpoint_times(killed)

    _finetune(demo_base, killed, max_steps)
    # the rerun resumed: it rewrote none of the killed run's checkpoints and wrote every later one
    assert _checkpoint_times(killed) == {**written, **_checkpoint_times(killed, after=resumes_from)}
    assert _checkpoints(killed) == [f"checkpoint-{step}" for step in range(SAVE_STEPS, max_steps + 1, SAVE_STEPS)]
    _assert_same_training(uninterrupted(max_steps), killed, steps=max_steps)


@pytest.mark.timeout(300)
def test_training_killed_from_outside_with_sigkill_and_resumed_ends_as_if_uninterrupted(demo_base, uninterrupted,
                                                                                       tmp_path):
    """A SIGKILL sent by another process as soon as checkpoint-2 appears: wherever it lands (saving, rotating, in
    step 3 or 4), the rerun of the same command ends as the uninterrupted run."""
    reference = uninterrupted(10)
    killed = tmp_path / "killed"
    victim = _start([sys.executable, os.path.join(ROOT, "finetune_generation.py")] + _kill_flags(demo_base, killed, 10),
                    killed)
    deadline = time.time() + 240
    while not os.path.isdir(killed / "checkpoint-2"):
        assert victim.poll() is None, open(f"{killed}.log").read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL
    assert not os.path.exists(killed / "train_results.json"), "the run ended before the kill"

    _finetune(demo_base, killed, 10)
    _assert_same_training(reference, killed, steps=10)


# ---------------------------------------------------------------- checkpoints that do not fit


def _broken_checkpoints(root):
    """name -> (directory, tensor_parallel_degree) of a tiny checkpoint broken one way each."""
    import json
    import shutil

    from conftest import tiny_config
    from paddle_glm.checkpoint import split_checkpoint
    from paddle_glm.models.glm import GLMForConditionalGeneration

    paddle.seed(0)
    good = root / "good"
    GLMForConditionalGeneration(tiny_config()).save_pretrained(str(good))
    weights = good / "model_state.pdparams"
    cases = {}
    for name in ("missing", "truncated", "shape", "empty"):
        shutil.copytree(good, root / name)
        cases[name] = (root / name, 1)
    state = paddle.load(str(weights))
    state.pop("glm.transformer.final_layernorm.bias")
    paddle.save(state, str(root / "missing" / "model_state.pdparams"))
    data = weights.read_bytes()
    (root / "truncated" / "model_state.pdparams").write_bytes(data[: len(data) // 2])
    config = json.loads((good / "config.json").read_text())
    config["vocab_size"] = 128
    (root / "shape" / "config.json").write_text(json.dumps(config))
    os.remove(root / "empty" / "model_state.pdparams")
    split_checkpoint(str(good), str(root / "shards"), 2)
    cases["shards_as_one"] = (root / "shards", 1)
    cases["shards_wrong_degree"] = (root / "shards", 4)
    return cases


@pytest.mark.parametrize("case,message", [
    ("missing", r"1 tensors missing \(e.g. \['glm.transformer.final_layernorm.bias'\]\)"),
    ("truncated", "can not parse the file|cannot be read"),
    ("shape", r"glm.word_embeddings.weight receives a shape \[96, 32\], but the expected shape is \[128, 32\]"),
    ("empty", "no model_state.pdparams or model.safetensors; it holds no weights"),
    ("shards_as_one", r"2 tensor-parallel shards: load them with --tensor_parallel_degree 2 or merge them first"),
    ("shards_wrong_degree", r"2 tensor-parallel shards but --tensor_parallel_degree 4"),
])
def test_checkpoint_that_does_not_fit_is_refused_never_partly_loaded(tmp_path, case, message):
    from paddle_glm.models.glm import GLMForConditionalGeneration

    directory, degree = _broken_checkpoints(tmp_path)[case]
    kwargs = {"tensor_parallel_degree": degree} if degree > 1 else {}
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        GLMForConditionalGeneration.from_pretrained(str(directory), **kwargs)
