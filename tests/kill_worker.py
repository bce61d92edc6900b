"""Runs `finetune_generation.py`'s main and SIGKILLs its own process at a chosen point, so that test_reliability.py
interrupts training at exactly the step it means to, whatever the machine's speed:

    python tests/kill_worker.py after-checkpoint-N FLAGS...   # the moment checkpoint-N is complete (renamed)
    python tests/kill_worker.py in-step-N FLAGS...            # as step N starts: checkpoint-N is never written
"""
import os
import signal
import sys

from paddle_glm.finetune import main
from paddle_glm.trainer import GLMTrainer


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at(point: str) -> None:
    """Patch `GLMTrainer` so that the process kills itself at `point`."""
    kind, step = point.rsplit("-", 1)
    step = int(step)
    if kind == "after-checkpoint":
        save = GLMTrainer._save_checkpoint

        def save_then_die(self, model, metrics=None):
            save(self, model, metrics)
            if self.state.global_step == step:
                die()

        GLMTrainer._save_checkpoint = save_then_die
    elif kind == "in-step":
        train_step = GLMTrainer.training_step

        def die_in_step(self, model, inputs):
            if self.state.global_step == step - 1:
                die()
            return train_step(self, model, inputs)

        GLMTrainer.training_step = die_in_step
    else:
        raise ValueError(f"kill point {point!r}: expected after-checkpoint-N or in-step-N")


if __name__ == "__main__":
    kill_at(sys.argv[1])
    main(sys.argv[2:])
