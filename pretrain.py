"""Pre-train GLM with its blank-infilling objective (or a ChatGLM model as a causal LM) on preprocessed corpora.

    python -m paddle_glm.preprocess --input corpus.jsonl --model_name_or_path M --output_prefix data/corpus
    python pretrain.py --model_name_or_path M --data_path data/corpus --output_dir out --max_steps 1000
    python -m paddle.distributed.launch --nproc_per_node 4 pretrain.py ... --tensor_parallel_degree 2
    python pretrain.py                                   # the bundled CPU demo
    python pretrain.py --help                            # every flag
"""
from paddle_glm.exit_order import leave_in_rank_order
from paddle_glm.pretrain import main

if __name__ == "__main__":
    main()
    leave_in_rank_order()
