"""Serve a model over OpenAI's HTTP API with continuous batching and streaming (`infer/server.py`).

    python serve_generation.py                                  # the demo export on http://127.0.0.1:8000
    python serve_generation.py --model_path EXPORT_DIR --backend onnxruntime --max_batch_size 32 --api_key KEY
    python serve_generation.py --help                           # every flag
"""
from infer.server import main

if __name__ == "__main__":
    main()
