"""Benchmark evaluation (MMLU, C-Eval, CMMLU, COPA, multiple-choice JSON lines) of a model of any family.

    python evaluate_generation.py --task mmlu --data_dir data/mmlu --model_name_or_path DIR
    python evaluate_generation.py --help                 # every flag, the scoring rules
"""
from paddle_glm.exit_order import leave_in_rank_order
from paddle_glm.evaluate import main

if __name__ == "__main__":
    main()
    leave_in_rank_order()
