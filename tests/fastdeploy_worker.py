"""Runs inside the Python 3.10 FastDeploy environment (no paddle there): decodes a job given as JSON on
stdin with FastDeployEngine and prints the sequences and prefill logits as JSON, for any family's export. Used by
test_fastdeploy.py and test_chatglm2_family.py."""
import json
import sys

import numpy as np

from infer.engines import FastDeployEngine
from infer.stepper import ExportedStepper
from paddle_glm.decoding import DecodingConfig, generate

job = json.load(sys.stdin)
engine = FastDeployEngine(job["export_dir"], {"prefill": "prefill", "decode": "decode"}, "cpu", 1)
batch = {key: np.array(value, dtype=job["dtypes"][key]) for key, value in job["batch"].items()}
logits = ExportedStepper(engine, batch).prefill(expand=1)  # the graph's inputs as any family's export takes them
results = {}
for name, settings in job["configs"].items():
    result = generate(ExportedStepper(engine, batch), len(batch["input_ids"]), DecodingConfig(**settings))
    results[name] = result.sequences
print(json.dumps({"prefill_logits": logits.tolist(), "sequences": results}))
