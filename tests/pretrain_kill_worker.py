"""Runs `pretrain.py`'s main and SIGKILLs its own process at a chosen point (kill points as tests/kill_worker.py):

    python tests/pretrain_kill_worker.py in-step-N FLAGS...
"""
import sys

from kill_worker import kill_at
from paddle_glm.pretrain import main

if __name__ == "__main__":
    kill_at(sys.argv[1])
    main(sys.argv[2:])
