"""Benchmark fine-tuning methods: full fine-tuning vs LoRA vs P-Tuning v2 prefixes, same run, same models.

For each model (the tiny demo GLM, and a 2-layer GLM with glm-large-chinese geometry: hidden 1024, 16 heads, vocab
50048; random weights) and each method, the script reports the trainable parameters, the size of what a run saves
(`save_pretrained`: the whole model, the adapter, the prefix) and the time of one optimizer step (AdamW, forward +
backward + update, loss on the target positions only as `GLMTrainer` computes it) on a batch of GLM blank-infilling
examples (part A bidirectional, part B the target). Methods: full; LoRA r=8 on the fused QKV (the family's default
target); prefix tuning with 128 tokens (`--pre_seq_len` default), plain and through `--prefix_projection`.

    python bench/bench_peft.py            # both models, batch 4 x 128 tokens, median of 10 steps
    python bench/bench_peft.py --smoke    # the tiny model, batch 2 x 32 tokens, 1 timed step: seconds
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Dict, List, Tuple

import numpy as np
import paddle
from paddlenlp.peft import LoRAConfig

from paddle_glm.args import set_device
from paddle_glm.demo import DEMO_MODEL_CONFIG
from paddle_glm.lora import GLMLoRAModel
from paddle_glm.models.glm import FAMILY, GLMConfig, GLMForConditionalGeneration
from paddle_glm.prefix import PrefixModel, prefix_config_for

MODELS = {
    "tiny demo GLM": dict(DEMO_MODEL_CONFIG, vocab_size=1504),
    "2-layer glm-large shape": dict(num_layers=2, vocab_size=50048, hidden_size=1024, num_attention_heads=16,
                                    max_sequence_length=1024, output_predict=True, parallel_output=False),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--source_length", type=int, default=96, help="part A tokens per example")
    parser.add_argument("--target_length", type=int, default=32, help="part B tokens per example")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps (after one warm-up step)")
    parser.add_argument("--pre_seq_len", type=int, default=128)
    parser.add_argument("--smoke", action="store_true", help="the tiny model, 2 x 32 tokens, 1 step (a test runs it)")
    args = parser.parse_args()
    if args.smoke:
        args.batch_size, args.source_length, args.target_length, args.steps = 2, 24, 8, 1
    return args


def with_method(method: str, model: GLMForConditionalGeneration, pre_seq_len: int) -> paddle.nn.Layer:
    """The model as the method trains it (only the trained parameters have stop_gradient False)."""
    if method == "full":
        return model
    if method == "LoRA r=8":
        lora_model = GLMLoRAModel(model, LoRAConfig(target_modules=list(FAMILY.lora_targets), r=8, lora_alpha=16))
        lora_model.mark_only_lora_as_trainable()
        return lora_model
    projection = method.endswith("projection")
    return PrefixModel(model, prefix_config_for(model, pre_seq_len, projection=projection))


METHODS = ("full", "LoRA r=8", "prefix tuning", "prefix tuning + projection")


def glm_batch(config: GLMConfig, batch: int, source: int, target: int, seed: int = 0) -> Dict[str, paddle.Tensor]:
    """Random ids in GLM's training layout: part A of `source` tokens (bidirectional), part B of `target` tokens."""
    rng = np.random.default_rng(seed)
    length = source + target
    positions = np.stack([np.minimum(np.arange(length), source - 1),
                          np.maximum(np.arange(length) - source + 1, 0)])
    return {
        "input_ids": paddle.to_tensor(rng.integers(10, config.vocab_size - 10, [batch, length])),
        "position_ids": paddle.to_tensor(np.tile(positions, (batch, 1, 1))),
        "attention_mask": paddle.to_tensor(np.full([batch], source)),
        "labels": paddle.to_tensor(rng.integers(10, config.vocab_size - 10, [batch, length])),
        "loss_mask": paddle.to_tensor(np.tile((np.arange(length) >= source - 1).astype("float32"), (batch, 1))),
    }


def step_seconds(model: paddle.nn.Layer, batch: Dict[str, paddle.Tensor], steps: int) -> float:
    """Median seconds of one AdamW step (after a warm-up step) over the trainable parameters: the median, as other
    processes on a shared machine slow some steps down."""
    trainable = [p for p in model.parameters() if not p.stop_gradient]
    optimizer = paddle.optimizer.AdamW(learning_rate=1e-4, parameters=trainable, weight_decay=0.01)
    model.train()

    def step() -> None:
        loss = model(**batch, loss_positions_only=True).loss
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()

    step()
    seconds = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - started)
    return float(np.median(seconds))


def saved_bytes(model: paddle.nn.Layer) -> int:
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        return sum(os.path.getsize(os.path.join(directory, name)) for name in os.listdir(directory))


def measure(name: str, config: dict, args: argparse.Namespace) -> List[Tuple[str, str, int, float, int, float]]:
    rows = []
    for method in METHODS:
        paddle.seed(0)
        model = with_method(method, GLMForConditionalGeneration(GLMConfig(**config)), args.pre_seq_len)
        total = sum(int(p.numel()) for p in model.parameters())
        trainable = sum(int(p.numel()) for p in model.parameters() if not p.stop_gradient)
        batch = glm_batch(model.config, args.batch_size, args.source_length, args.target_length)
        rows.append((name, method, trainable, 100.0 * trainable / total, saved_bytes(model),
                     step_seconds(model, batch, args.steps)))
    return rows


def size(count: int) -> str:
    return f"{count / 2 ** 20:.1f} MiB" if count >= 2 ** 20 else f"{count / 2 ** 10:.0f} KiB"


def main() -> None:
    args = parse_args()
    set_device("cpu")  # as the CLIs do; process settings, so a reference timed here runs with them too
    models: Dict[str, dict] = {"tiny demo GLM": MODELS["tiny demo GLM"]} if args.smoke else MODELS
    rows = [row for name, config in models.items() for row in measure(name, config, args)]
    print(f"batch {args.batch_size} x ({args.source_length} + {args.target_length}) tokens, pre_seq_len "
          f"{args.pre_seq_len}, AdamW, {paddle.get_device()}, {os.cpu_count()} CPUs, median of {args.steps} steps")
    print("| model | method | trainable parameters | trainable % | checkpoint | step time |")
    print("|---|---|---:|---:|---:|---:|")
    for name, method, trainable, share, saved, seconds in rows:
        print(f"| {name} | {method} | {trainable:,} | {share:.2f}% | {size(saved)} | {seconds * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
