"""FastDeploy 1.0.7 (ONNX Runtime backend) runs the ONNX export with the same tokens as Paddle Inference.

FastDeploy has wheels for Python <= 3.10 only, so the check runs in a separate environment
(`make test` builds `.venv-fastdeploy` when a Python 3.10 exists; PADDLE_GLM_FASTDEPLOY_PYTHON
may point at another). Without one the test is skipped and says why.
"""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from infer.runner import GLMRunner
from paddle_glm.decoding import DecodingConfig
from paddle_glm.inputs import generation_batch, prefill_attention_mask
from paddle_glm.models import load_template

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASTDEPLOY_PYTHON = os.environ.get("PADDLE_GLM_FASTDEPLOY_PYTHON", os.path.join(ROOT, ".venv-fastdeploy", "bin", "python"))
TEXTS = ["答案：巴黎，上下文：巴黎是法国的首都，位于欧洲。", "答案：长江", "答案：1998年，上下文：云海公司于1998年推出了手表。"]


def fastdeploy_decode(export_dir: str, batch: dict, configs: dict) -> dict:
    """Run `tests/fastdeploy_worker.py` in the FastDeploy environment on a generation batch and named DecodingConfig
    fields: {"prefill_logits": [B, V], "sequences": {name: sequences}}. Skips the test without that environment."""
    if not os.path.isfile(FASTDEPLOY_PYTHON):
        pytest.skip(f"no FastDeploy environment at {FASTDEPLOY_PYTHON}: fastdeploy-python 1.0.7 needs Python <= 3.10 "
                    "(make test builds it when python3.10 exists; none was found)")
    job = {"export_dir": export_dir, "configs": configs,
           "batch": {k: v.tolist() for k, v in batch.items()}, "dtypes": {k: str(v.dtype) for k, v in batch.items()}}
    done = subprocess.run([FASTDEPLOY_PYTHON, os.path.join(ROOT, "tests", "fastdeploy_worker.py")],
                          input=json.dumps(job), capture_output=True, text=True, timeout=280,
                          env={**os.environ, "PYTHONPATH": ROOT}, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(300)
def test_fastdeploy_runner_equals_paddle_inference(exported):
    template = load_template(exported["dir"])
    prompts = [template.generation_example(template.prompt_ids(t, (), 64)[0]) for t in TEXTS]
    batch = generation_batch(prompts, template.pad_id)
    base = dict(eos_token_id=template.stop_ids, pad_token_id=template.pad_id, max_length=12,
                tokenizer_size=template.tokenizer_size)
    configs = {"greedy": dict(base), "beam": dict(base, decode_strategy="beam_search", num_beams=3)}
    answer = fastdeploy_decode(exported["dir"], batch, configs)

    runner = GLMRunner(exported["dir"], backend="paddle")
    feeds = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
             "attention_mask": prefill_attention_mask(batch["key_mask"], batch["sep"])}
    paddle_logits = runner.prompt_logits(**feeds)
    assert np.abs(np.array(answer["prefill_logits"]) - paddle_logits).max() <= 1e-4
    for name, settings in configs.items():
        assert answer["sequences"][name] == runner.generate(prompts, DecodingConfig(**settings)).sequences
