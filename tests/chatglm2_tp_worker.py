"""Runs under `paddle.distributed.launch --nproc_per_node N` for test_chatglm2.py: loads each whole (tp=1) ChatGLM2
checkpoint given split over the N ranks by `ChatGLMv2ForCausalLM._get_tensor_parallel_mappings`, and writes what the
test compares with the one-process model (which `run_checks` computes there too): logits, loss, gradients, cached
decode logits, this rank's shard, and the checkpoint merged back by PaddleNLP's `merge_tensor_parallel` save."""
import os
import sys

import numpy as np
import paddle

from paddle_glm.exit_order import leave_in_rank_order


def run_checks(model, inputs) -> dict:
    """Logits, loss (label smoothing 0.1), the parameters' gradients and the logits of a prefill + 2 cached decode
    steps on `inputs` (numpy: input_ids, position_ids, attention_mask [B, 1, S, S], labels, loss_mask)."""
    tensors = {key: paddle.to_tensor(value) for key, value in inputs.items()}
    ids, positions, mask = tensors["input_ids"], tensors["position_ids"], tensors["attention_mask"]
    model.eval()
    logits = model(ids, positions, mask).logits
    loss = model(ids, positions, mask, labels=tensors["labels"], loss_mask=tensors["loss_mask"], label_smoothing=0.1).loss
    loss.backward()
    grads = {name: p.grad.numpy() for name, p in model.named_parameters() if p.grad is not None}
    with paddle.no_grad():
        prompt = ids.shape[1] - 2
        output = model(ids[:, :prompt], positions[:, :prompt], mask[:, :, :prompt, :prompt])
        decoded = [output.logits[:, -1]]
        for t in range(prompt, prompt + 2):
            output = model(ids[:, t:t + 1], positions[:, t:t + 1], mask[:, :, t:t + 1, :t + 1],
                           cache=output.past_key_values)
            decoded.append(output.logits[:, -1])
    return {"logits": logits.numpy(), "loss": float(loss), "grads": grads,
            "decoded": paddle.stack(decoded, axis=1).numpy()}


def main(output: str, *checkpoints: str) -> None:
    from paddle_glm.models.chatglm2 import ChatGLMv2ForCausalLM
    from paddle_glm.predict import init_tensor_parallel

    degree, rank = init_tensor_parallel()
    for checkpoint in checkpoints:
        name = os.path.basename(checkpoint)
        model = ChatGLMv2ForCausalLM.from_pretrained(checkpoint, tensor_parallel_degree=degree,
                                                     tensor_parallel_rank=rank)
        result = run_checks(model, dict(np.load(os.path.join(checkpoint, "inputs.npz"))))
        np.savez(os.path.join(output, f"{name}-rank{rank}.npz"), logits=result["logits"], loss=result["loss"],
                 decoded=result["decoded"], **{f"grad:{k}": v for k, v in result["grads"].items()})
        model.save_pretrained(os.path.join(output, f"{name}-shards"), is_main_process=rank == 0)
        model.save_pretrained(os.path.join(output, f"{name}-merged"), merge_tensor_parallel=True,
                              is_main_process=rank == 0)


if __name__ == "__main__":
    main(*sys.argv[1:])
    leave_in_rank_order()  # as the scripts do: no rank aborts on its way out (exit code -6 after the work)
