"""Runs inside the Python 3.10 FastDeploy environment (no paddle there): decodes a job given as JSON on
stdin with FastDeployEngine and prints the sequences and prefill logits as JSON. Used by test_fastdeploy.py."""
import json
import sys

import numpy as np

from infer.engines import FastDeployEngine
from infer.stepper import ExportedStepper
from paddle_glm.decoding import DecodingConfig, generate
from paddle_glm.inputs import prefill_attention_mask

job = json.load(sys.stdin)
engine = FastDeployEngine(job["export_dir"], {"prefill": "prefill", "decode": "decode"}, "cpu", 1)
batch = {key: np.array(value, dtype=job["dtypes"][key]) for key, value in job["batch"].items()}
logits, _ = engine.run("prefill", {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
                                   "attention_mask": prefill_attention_mask(batch["key_mask"], batch["sep"])})
results = {}
for name, settings in job["configs"].items():
    result = generate(ExportedStepper(engine, batch), len(batch["input_ids"]), DecodingConfig(**settings))
    results[name] = result.sequences
print(json.dumps({"prefill_logits": logits.tolist(), "sequences": results}))
