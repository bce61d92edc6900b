"""Runs inside the Python 3.10 FastDeploy environment (no paddle there): decodes a job given as JSON on
stdin with FastDeployEngine and prints the sequences and prefill logits as JSON, for any family's export. Used by
test_fastdeploy.py, test_chatglm_family.py and test_chatglm2_family.py."""
import json
import os
import sys

import numpy as np

from infer.engines import FastDeployEngine
from infer.stepper import ExportedStepper
from paddle_glm.decoding import DecodingConfig, generate

job = json.load(sys.stdin)
with open(os.path.join(job["export_dir"], "export_config.json"), encoding="utf-8") as handle:
    config = json.load(handle)
prefix_file = os.path.join(job["export_dir"], "prefix_cache.npy")
prefix = np.load(prefix_file) if config["prefix_tokens"] else None
engine = FastDeployEngine(job["export_dir"], config["graph"], config["dtype"], "cpu", 1)
batch = {key: np.array(value, dtype=job["dtypes"][key]) for key, value in job["batch"].items()}
logits = ExportedStepper(engine, batch, config, 1, prefix).prefill(expand=1)  # the prompt pass, any family's export
results = {}
for name, settings in job["configs"].items():
    decoding = DecodingConfig(**settings)
    stepper = ExportedStepper(engine, batch, config, decoding.max_length, prefix)
    results[name] = generate(stepper, len(batch["input_ids"]), decoding).sequences
print(json.dumps({"prefill_logits": logits.tolist(), "sequences": results}))
