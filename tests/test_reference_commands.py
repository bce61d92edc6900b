"""The command lines of PaddleNLP's `examples/language_model/glm` (the example this project replaces) run unchanged.

Each test runs one of the reference's documented commands as a user types it, as a subprocess that must exit 0,
with only what the reference tells users to change: the model path (the demo's tiny GLM), the data files, lengths
that fit the tiny model's 256 positions, `--fp16` dropped on a CPU, and a few steps instead of 4 epochs. The
`--gpus` form of the launcher is GPU-only; on CPU the same launch is `--nproc_per_node`.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.timeout(900)

# The reference's fine-tuning command (README of examples/language_model/glm), with --fp16 dropped and
# `--src_length 608 --tgt_length 160 --min_tgt_length 55` brought within the tiny model's 256 positions.
REFERENCE_FINETUNE = (
    "--num_train_epochs 4 --learning_rate 3e-5 --warmup_ratio 0.06 --weight_decay 0.1 --label_smoothing 0.1 "
    "--save_steps 100 --logging_steps 1 --eval_steps 100 --src_length 96 --tgt_length 24 --min_tgt_length 5 "
    "--length_penalty 0.7 --no_repeat_ngram_size 3 --num_beams 5 --select_topk True --per_device_eval_batch_size 2 "
    "--per_device_train_batch_size 2 --max_grad_norm 1.0 --lr_scheduler_type linear --fp16_opt_level O2 --recompute "
    "--do_train --do_eval"
).split()
FEW_STEPS = ["--max_steps", "2", "--max_train_samples", "16", "--max_eval_samples", "2"]  # (the QG file ends with BELLE lines)


def run(*command: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python <command>` in the repository root like a user; it must exit 0."""
    done = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def launch(log_dir, script: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m paddle.distributed.launch --nproc_per_node 2 script args` (the reference's `--gpus 0,1` on CPU)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return run("-m", "paddle.distributed.launch", "--master", f"127.0.0.1:{port}", "--nproc_per_node", "2",
               "--log_dir", str(log_dir), script, *args)


@pytest.fixture(scope="module")
def trained(demo_base, tmp_path_factory):
    """The reference's fine-tuning command, then the same with `--lora True --r 8`."""
    root = tmp_path_factory.mktemp("reference")
    data = ["--train_file", demo_base["qg"]["train"], "--dev_file", demo_base["qg"]["dev"]]
    full, lora = root / "glm-large-chinese", root / "glm-large-chinese-lora"
    run("finetune_generation.py", "--model_name_or_path", demo_base["model"], *REFERENCE_FINETUNE,
        "--output_dir", str(full), *data, *FEW_STEPS)
    run("finetune_generation.py", "--model_name_or_path", demo_base["model"], *REFERENCE_FINETUNE,
        "--output_dir", str(lora), *data, *FEW_STEPS, "--lora", "True", "--r", "8")
    return {"root": root, "full": full, "lora": lora, "base": demo_base["model"], "data": data}


def test_reference_finetune_and_lora_commands_train_evaluate_and_save(trained):
    for name in ("full", "lora"):
        with open(trained[name] / "trainer_state.json") as handle:
            assert json.load(handle)["global_step"] == 2
        with open(trained[name] / "eval_results.json") as handle:
            assert {"eval_bleu4", "eval_rougeL"} <= set(json.load(handle))
        assert (trained[name] / "training_curves.png").is_file()
    with open(trained["lora"] / "lora_config.json") as handle:
        assert json.load(handle)["r"] == 8


def test_reference_tensor_parallel_finetune_then_predict_merges_the_checkpoint(trained, tmp_path):
    output = tmp_path / "glm-tp"
    launch(tmp_path / "log-train", "finetune_generation.py", "--model_name_or_path", trained["base"],
           *REFERENCE_FINETUNE, "--output_dir", str(output), *trained["data"], *FEW_STEPS, "--save_steps", "2",
           "--tensor_parallel_degree", "2")
    checkpoint = output / "checkpoint-2"
    assert sorted(os.listdir(checkpoint)).count("model_state.tp00.pdparams") == 1
    merged = tmp_path / "glm-merged"
    launch(tmp_path / "log-predict", "predict_generation.py", "--model_name_or_path", f"{checkpoint}/",
           "--merge_tensor_parallel_path", str(merged))
    assert (merged / "model_state.pdparams").is_file()
    # The merged model predicts the built-in example texts in one process, like the reference.
    done = run("predict_generation.py", "--model_name_or_path", str(merged))
    assert len([line for line in done.stdout.splitlines() if line.startswith("{")]) == 3


def test_reference_export_then_infer_by_model_prefix(trained, tmp_path):
    infer_dir = tmp_path / "infer"
    run("export_generation_model.py", "--model_name_or_path", str(trained["full"]),
        "--output_path", str(infer_dir / "glm"), "--tgt_length", "24")
    done = run("infer_generation.py", "--model_path", str(infer_dir), "--model_prefix", "glm")
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(records) == 3 and all(isinstance(r["prediction"], str) for r in records)


def test_reference_export_with_lora_path_folds_the_adapter(trained, tmp_path):
    run("export_generation_model.py", "--model_name_or_path", trained["base"], "--output_path",
        str(tmp_path / "infer" / "glm"), "--lora_path", str(trained["lora"]), "--tgt_length", "24")
    run("export_generation_model.py", "--model_name_or_path", trained["base"], "--output_path",
        str(tmp_path / "plain" / "glm"), "--tgt_length", "24")
    from infer.runner import GLMRunner

    feeds = {"input_ids": np.array([[5, 6, 7]]), "position_ids": np.array([[[0, 1, 2], [0, 0, 0]]]),
             "attention_mask": np.ones([1, 1, 3, 3], dtype="float32")}
    logits = [GLMRunner(str(tmp_path / name / "glm")).prompt_logits(**feeds) for name in ("infer", "plain")]
    assert not np.array_equal(logits[0], logits[1])  # the trained adapter (B moved off zero) is in the graph


def test_reference_predict_commands(trained):
    done = run("predict_generation.py", "--model_name_or_path", str(trained["full"]))
    assert "built-in example texts" in done.stderr
    assert len([line for line in done.stdout.splitlines() if line.startswith("{")]) == 3
    # Quiet by default (a newcomer sees predictions, not nine vocabulary lines per tokenizer); --verbose shows all.
    for noise in ("Adding <|endoftext|> to the vocabulary", "No ccache found", "Setuptools is replacing distutils",
                  "Loading configuration file"):
        assert noise not in done.stderr
    verbose = run("predict_generation.py", "--model_name_or_path", str(trained["full"]), "--verbose")
    assert "Adding <|endoftext|> to the vocabulary" in verbose.stderr and "Loading configuration file" in verbose.stderr
    run("predict_generation.py", "--model_name_or_path", trained["base"], "--lora_path", str(trained["lora"]))


def test_reference_belle_by_name_reads_paddlenlps_bellegroup_set(demo_base, tmp_path, monkeypatch):
    """`--task_name school_math_0.25M --data_name bellegroup` goes through PaddleNLP's `bellegroup` data set; here its
    download is pointed at local files (no network), which PaddleNLP's own reader parses."""
    from paddlenlp.datasets.bellegroup import BelleGroup

    from paddle_glm.finetune import main

    files = {}
    for split in ("train", "dev"):  # BELLE's release format: every line has instruction, input and output
        with open(demo_base["belle"][split], encoding="utf-8") as handle:
            records = [json.loads(line) for line in handle]
        files[split] = str(tmp_path / f"belle-{split}.json")
        with open(files[split], "w", encoding="utf-8") as handle:
            for record in records:
                if "instruction" in record:
                    handle.write(json.dumps({"instruction": record["instruction"], "input": record.get("input", ""),
                                             "output": record["output"]}, ensure_ascii=False) + "\n")
    requested = []
    monkeypatch.setattr(BelleGroup, "_get_data", lambda self, mode, **kw: requested.append((self.name, mode))
                        or files[mode])
    main(["--model_name_or_path", demo_base["model"], "--task_name", "school_math_0.25M", "--data_name", "bellegroup",
          "--output_dir", str(tmp_path), *REFERENCE_FINETUNE, *FEW_STEPS, "--disable_tqdm", "true"],
         demo="instruction_argument.json", task_name="belle")
    assert requested == [("school_math_0.25M", "train"), ("school_math_0.25M", "dev")]
    with open(tmp_path / "eval_predictions.jsonl", encoding="utf-8") as handle:
        sources = [json.loads(line)["source"] for line in handle]
    from paddle_glm.data import read_pairs
    from tasks import belle

    assert sources == [pair[0] for pair in read_pairs(files["dev"], lambda r, w: belle.to_pairs(r, w), limit=2)]


@pytest.mark.parametrize("flags, message", [
    (["--task_name", "school_math_0.25M", "--data_name", "bellegroup"],
     "could not download the train split of bellegroup/school_math_0.25M from https://"),
    (["--task_name", "dureader_qg"], "could not download the train split of dureader_qg from https://"),
])
def test_named_data_offline_is_one_clear_line(demo_base, tmp_path, monkeypatch, flags, message):
    """Offline (the download raises as Paddle's downloader does), the error names the download and the flags instead."""
    import paddle.utils.download as download

    def offline(url, *args, **kwargs):
        raise RuntimeError(f"Download from {url} failed. Retry limit reached")

    monkeypatch.setattr(download, "get_path_from_url", offline)
    monkeypatch.setattr("paddlenlp.datasets.bellegroup.get_path_from_url", offline)
    monkeypatch.setattr("paddlenlp.datasets.dureader_qg.get_path_from_url", offline)
    monkeypatch.setenv("PPNLP_HOME", str(tmp_path / "home"))
    from paddle_glm.args import InputError
    from paddle_glm.finetune import main

    with pytest.raises(InputError, match=message) as raised:
        main(["--model_name_or_path", demo_base["model"], *flags, "--output_dir", str(tmp_path / "out"),
              *REFERENCE_FINETUNE, *FEW_STEPS])
    assert "--train_file and --dev_file" in str(raised.value) and "\n" not in str(raised.value)


def test_fp16_on_a_cpu_build_is_refused_with_the_fix(demo_base, tmp_path):
    data = ["--train_file", demo_base["qg"]["train"], "--dev_file", demo_base["qg"]["dev"]]
    done = subprocess.run([sys.executable, "finetune_generation.py", "--model_name_or_path", demo_base["model"],
                           *data, "--output_dir", str(tmp_path), "--fp16", *REFERENCE_FINETUNE],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "error: invalid arguments:\n  - --fp16 needs a GPU" in done.stderr and "drop --fp16" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("cuda, gpus, expected", [(False, 0, "cpu"), (True, 0, "cpu"), (True, 2, "gpu")])
def test_default_device_follows_the_paddle_build(monkeypatch, cuda, gpus, expected):
    """Without --device every script takes the GPU when Paddle is built with CUDA and one is visible, else the CPU
    (PaddleNLP's own default, gpu, stops every command on a CPU build)."""
    import paddle

    from paddle_glm.args import default_device
    from paddle_glm.finetune import parse_arguments

    monkeypatch.setattr(paddle, "is_compiled_with_cuda", lambda: cuda)
    monkeypatch.setattr(paddle.device.cuda, "device_count", lambda: gpus)
    assert default_device() == expected
    *_, training_args = parse_arguments(["--output_dir", "/tmp/unused", "--train_file", "x.json"], "unused.json")
    assert training_args.device == expected
    *_, training_args = parse_arguments(["--output_dir", "/tmp/unused", "--device", "cpu"], "unused.json")
    assert training_args.device == "cpu"
