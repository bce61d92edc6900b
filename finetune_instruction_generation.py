"""Fine-tune GLM on BELLE instruction data (instruction/input/output, multi-turn).

    python finetune_instruction_generation.py           # the bundled CPU demo
    python finetune_instruction_generation.py ARGS.json # flags from a JSON file
    python finetune_instruction_generation.py --help    # every flag (--task_name defaults to belle here)
"""
from paddle_glm.exit_order import leave_in_rank_order
from paddle_glm.finetune import main

if __name__ == "__main__":
    main(demo="instruction_argument.json", task_name="belle")
    leave_in_rank_order()
