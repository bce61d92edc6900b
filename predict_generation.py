"""Predict with a fine-tuned GLM in dynamic graph (optionally with a LoRA adapter).

    python predict_generation.py                        # the fine-tuning demo's checkpoint, a few demo texts
    python predict_generation.py --help                 # every flag
"""
from paddle_glm.exit_order import leave_in_rank_order
from paddle_glm.predict import main

if __name__ == "__main__":
    main()
    leave_in_rank_order()
