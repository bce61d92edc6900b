"""Runs under `paddle.distributed.launch --nproc_per_node N`: loads a tp=1 ChatGLM checkpoint split over the N ranks
and saves the logits, loss and gradient shards that test_chatglm.py compares with the one-process model."""
import sys

import numpy as np

from paddle_glm.exit_order import leave_in_rank_order


def main(checkpoint: str, output: str) -> None:
    from paddle_glm.models.chatglm import ChatGLMForCausalLM
    from paddle_glm.predict import init_tensor_parallel
    from tp_worker import forward_backward

    degree, rank = init_tensor_parallel()
    model = ChatGLMForCausalLM.from_pretrained(
        checkpoint, tensor_parallel_degree=degree, tensor_parallel_rank=rank)
    result = forward_backward(model, dict(np.load(f"{checkpoint}/inputs.npz")))
    np.savez(f"{output}/rank{rank}.npz", logits=result["logits"], loss=result["loss"],
             **{f"grad:{k}": v for k, v in result["grads"].items()})


if __name__ == "__main__":
    main(*sys.argv[1:])
    leave_in_rank_order()  # as the scripts do: no rank aborts on its way out (exit code -6 after the work)
