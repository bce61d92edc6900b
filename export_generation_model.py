"""Export a (fine-tuned) GLM to static prefill/decode graphs for `infer_generation.py`.

    python export_generation_model.py                   # the fine-tuning demo's checkpoint
    python export_generation_model.py --help            # every flag
"""
from export.exporter import main

if __name__ == "__main__":
    main()
