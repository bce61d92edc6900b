"""Runs under `paddle.distributed.launch --nproc_per_node N` for test_prefix.py: each checkpoint directory given holds
a whole (tp=1) model, a prefix (`prefix/`) and `inputs.npz`; every rank loads its shard of the model and the whole
prefix, and writes the loss, the logits and the prefix encoder's gradients (`run_checks`, which the test runs in one
process too) to OUTPUT/NAME-rankR.npz."""
import os
import sys

import numpy as np
import paddle

from paddle_glm.exit_order import leave_in_rank_order


def run_checks(prefix_model, inputs) -> dict:
    """Logits, loss and the prefix encoder's gradients on `inputs` (numpy: input_ids, position_ids, attention_mask
    (sep), labels, loss_mask)."""
    tensors = {key: paddle.to_tensor(value) for key, value in inputs.items()}
    output = prefix_model(tensors["input_ids"], tensors["position_ids"], tensors["attention_mask"],
                          labels=tensors["labels"], loss_mask=tensors["loss_mask"])
    output.loss.backward()
    grads = {name: p.grad.numpy() for name, p in prefix_model.prefix_encoder.named_parameters()}
    logits = prefix_model(tensors["input_ids"], tensors["position_ids"], tensors["attention_mask"]).logits
    return {"loss": float(output.loss), "logits": logits.numpy(), "grads": grads}


def main(output: str, *checkpoints: str) -> None:
    from paddle_glm.models import family_of
    from paddle_glm.prefix import load_prefix
    from paddle_glm.predict import init_tensor_parallel

    degree, rank = init_tensor_parallel()
    for checkpoint in checkpoints:
        model = family_of(checkpoint).model_class.from_pretrained(checkpoint, tensor_parallel_degree=degree,
                                                                  tensor_parallel_rank=rank)
        result = run_checks(load_prefix(model, os.path.join(checkpoint, "prefix")),
                            dict(np.load(os.path.join(checkpoint, "inputs.npz"))))
        np.savez(os.path.join(output, f"{os.path.basename(checkpoint)}-rank{rank}.npz"), loss=result["loss"],
                 logits=result["logits"], **{f"grad:{k}": v for k, v in result["grads"].items()})


if __name__ == "__main__":
    main(*sys.argv[1:])
    leave_in_rank_order()  # as the scripts do: no rank aborts on its way out (exit code -6 after the work)
