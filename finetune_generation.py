"""Fine-tune GLM for question generation (DuReaderQG) or any JSON-lines task.

    python finetune_generation.py                       # the bundled CPU demo
    python finetune_generation.py ARGS.json             # flags from a JSON file
    python finetune_generation.py --help                # every flag
"""
from paddle_glm.exit_order import leave_in_rank_order
from paddle_glm.finetune import main

if __name__ == "__main__":
    main(demo="finetune_argument.json")
    leave_in_rank_order()
