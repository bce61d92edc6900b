"""Runs under `paddle.distributed.launch --nproc_per_node N`: loads a tp=1 checkpoint (and optionally a tp=1 LoRA
adapter) split over the N ranks and saves what test_parallel.py compares with the single-process model, which
`forward_backward` computes there too."""
import sys

import numpy as np
import paddle

from paddle_glm.exit_order import leave_in_rank_order


def forward_backward(model, inputs) -> dict:
    """Logits, loss (label smoothing 0.1) and the gradients of the trainable parameters on `inputs` (numpy)."""
    tensors = {key: paddle.to_tensor(value) for key, value in inputs.items()}
    model.eval()
    logits = model(tensors["input_ids"], tensors["position_ids"], tensors["attention_mask"]).logits
    loss = model(tensors["input_ids"], tensors["position_ids"], tensors["attention_mask"], labels=tensors["labels"],
                 loss_mask=tensors["loss_mask"], label_smoothing=0.1).loss
    loss.backward()
    grads = {name: p.grad.numpy() for name, p in model.named_parameters() if p.grad is not None}
    return {"logits": logits.numpy(), "loss": float(loss), "grads": grads}


def main(checkpoint: str, output: str, lora_path: str = None) -> None:
    from paddle_glm.lora import load_adapter
    from paddle_glm.models.glm import GLMForConditionalGeneration
    from paddle_glm.predict import init_tensor_parallel

    degree, rank = init_tensor_parallel()
    model = GLMForConditionalGeneration.from_pretrained(
        checkpoint, tensor_parallel_degree=degree, tensor_parallel_rank=rank)
    if lora_path:
        model = load_adapter(model, lora_path)
    result = forward_backward(model, dict(np.load(f"{checkpoint}/inputs.npz")))
    np.savez(f"{output}/rank{rank}.npz", logits=result["logits"], loss=result["loss"],
             **{f"grad:{k}": v for k, v in result["grads"].items()})


if __name__ == "__main__":
    main(*sys.argv[1:])
    leave_in_rank_order()  # as the scripts do: no rank aborts on its way out (exit code -6 after the work)
