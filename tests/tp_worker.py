"""Runs under `paddle.distributed.launch --nproc_per_node N`: loads a tp=1 checkpoint (and optionally a tp=1 LoRA
adapter) split over the N ranks and saves what test_parallel.py compares with the single-process model
(logits, loss, the gradients of the trainable parameters)."""
import sys

import numpy as np
import paddle
import paddle.distributed as dist
from paddle.distributed import fleet

from paddle_glm.lora import load_adapter
from paddle_glm.model import GLMForConditionalGeneration

checkpoint, output = sys.argv[1], sys.argv[2]
lora_path = sys.argv[3] if len(sys.argv) > 3 else None
strategy = fleet.DistributedStrategy()
strategy.hybrid_configs = {"dp_degree": 1, "mp_degree": dist.get_world_size(), "pp_degree": 1}
fleet.init(is_collective=True, strategy=strategy)
rank = fleet.get_hybrid_communicate_group().get_model_parallel_rank()
model = GLMForConditionalGeneration.from_pretrained(
    checkpoint, tensor_parallel_degree=dist.get_world_size(), tensor_parallel_rank=rank)
if lora_path:
    model = load_adapter(model, lora_path)
inputs = {key: paddle.to_tensor(value) for key, value in np.load(f"{checkpoint}/inputs.npz").items()}
model.eval()
logits = model(inputs["input_ids"], inputs["position_ids"], inputs["attention_mask"]).logits
loss = model(inputs["input_ids"], inputs["position_ids"], inputs["attention_mask"], labels=inputs["labels"],
             loss_mask=inputs["loss_mask"], label_smoothing=0.1).loss
loss.backward()
grads = {name: p.grad.numpy() for name, p in model.named_parameters() if p.grad is not None}
np.savez(f"{output}/rank{rank}.npz", logits=logits.numpy(), loss=loss.numpy(),
         **{f"grad:{k}": v for k, v in grads.items()})
