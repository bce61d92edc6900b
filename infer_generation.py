"""Serve an exported GLM (export_generation_model.py) with Paddle Inference, ONNX Runtime or FastDeploy.

    python infer_generation.py                          # the demo export, a few demo texts
    python infer_generation.py --help                   # every flag
"""
from infer.runner import main

if __name__ == "__main__":
    main()
