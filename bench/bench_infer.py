"""Serving speed: the exported runner (each backend) against PaddleNLP's dygraph `generate`, same weights.

Random weights with glm-large-chinese geometry (hidden 1024, 16 heads, vocab 50048), layers
configurable; every row is measured in the same run and printed as tokens/s and a ratio to
PaddleNLP. The last column is the memory-bandwidth bound of one decode step at batch 1: the bytes of
weights a step must read (all of them) divided by a bandwidth measured here with a large GEMV.

    python bench/bench_infer.py                  # 2 layers; prompts 128 and 608; greedy and 5 beams; batch 1 and 8
    python bench/bench_infer.py --layers 6 --grid full
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import paddle
from bench_cache import CLS, EOP, GMASK, PAD, SOP, build_models, reference_inputs  # the script's own folder

from export.exporter import export_generation_model
from infer.runner import GLMRunner
from paddle_glm.decoding import DecodingConfig
from paddle_glm.generation import generate
from paddle_glm.models.glm import GLMTemplate

GRIDS = {
    # (prompt length, batch, beams); "default" keeps PaddleNLP's slowest cases out so it runs in minutes
    "default": [(128, 1, 1), (128, 8, 1), (128, 1, 5), (608, 1, 1)],
    "full": [(p, b, k) for p in (128, 608) for b in (1, 8) for k in (1, 5)],
}


class FixedTokenizer:
    """What export needs of a tokenizer, for random weights without vocabulary files."""

    pad_token_id = eos_token_id = PAD
    cls_token_id, sop_token_id, eop_token_id, gmask_token_id = CLS, SOP, EOP, GMASK
    smask_token_id, mask_token_id = 50008, 50003

    def __len__(self):
        return 50010

    def save_pretrained(self, path):
        pass


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="transformer layers (glm-large-chinese has 24)")
    parser.add_argument("--new_tokens", type=int, default=32, help="tokens generated per prompt")
    parser.add_argument("--grid", choices=sorted(GRIDS), default="default", help="which (prompt, batch, beams) rows")
    parser.add_argument("--backends", default="paddle,onnxruntime", help="comma-separated runner backends")
    parser.add_argument("--cpu_threads", type=int, default=os.cpu_count(), help="threads of the runners")
    return parser.parse_args()


def measured_bandwidth() -> float:
    """Bytes per second a GEMV reads weights at (256 MB fp32 matrix, best of 5)."""
    matrix = np.random.default_rng(0).random((8192, 8192), dtype=np.float32)
    vector = np.ones(8192, dtype=np.float32)
    best = min(_seconds(lambda: matrix @ vector) for _ in range(5))
    return matrix.nbytes / best


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def prompts_for(prompt_length: int, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    sources = [[CLS] + rng.integers(100, 40000, prompt_length - 3).tolist() + [GMASK, PAD] for _ in range(batch)]
    mask_pos = prompt_length - 2
    ours = [{"input_ids": np.array(s + [SOP]),
             "position_ids": np.array([list(range(prompt_length)) + [mask_pos], [0] * prompt_length + [1]])}
            for s in sources]
    return sources, ours, mask_pos


def main() -> None:
    args = parse_args()
    ours, reference = build_models(args.layers)
    export_dir = tempfile.mkdtemp(prefix="glm-bench-export-")
    export_generation_model(ours, GLMTemplate(FixedTokenizer()), export_dir, "float32", 1024 - args.new_tokens - 1,
                            args.new_tokens, onnx="onnxruntime" in args.backends)
    runners = {name: GLMRunner(export_dir, backend=name, cpu_threads=args.cpu_threads)
               for name in args.backends.split(",")}
    weight_bytes = sum(int(p.numel()) * 4 for p in ours.parameters())
    bound = measured_bandwidth() / weight_bytes
    print(f"GLM {args.layers} layers x hidden 1024, vocab 50048 ({weight_bytes / 1e6:.0f} MB fp32), "
          f"{args.new_tokens} new tokens, CPU ({os.cpu_count()} cores); tokens/s (ratio to PaddleNLP)")
    print(f"memory-bandwidth bound at batch 1: {bound:.1f} tokens/s")
    header = ["prompt", "batch", "beams", "PaddleNLP", "ours dygraph"] + [f"runner {n}" for n in runners]
    print(" | ".join(header))
    for prompt_length, batch, beams in GRIDS[args.grid]:
        sources, prompts, mask_pos = prompts_for(prompt_length, batch)
        strategy = "beam_search" if beams > 1 else "greedy_search"
        config = DecodingConfig(decode_strategy=strategy, num_beams=beams, max_length=args.new_tokens,
                                min_length=args.new_tokens, eos_token_id=EOP, pad_token_id=PAD)
        ids, position_ids, attention_mask = reference_inputs(sources, mask_pos, args.new_tokens)
        with paddle.no_grad():
            reference_seconds = _seconds(lambda: reference.generate(
                input_ids=ids, position_ids=position_ids, attention_mask=attention_mask, decode_strategy=strategy,
                num_beams=beams, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                eos_token_id=EOP, pad_token_id=PAD, use_cache=True,
            ))
        tokens = batch * args.new_tokens
        cells = [str(prompt_length), str(batch), str(beams), f"{tokens / reference_seconds:.1f}"]
        timings = {"dygraph": _seconds(lambda: generate(ours, prompts, config))}
        timings.update({name: _seconds(lambda r=runner: r.generate(prompts, config)) for name, runner in runners.items()})
        cells += [f"{tokens / s:.1f} ({reference_seconds / s:.1f}x)" for s in timings.values()]
        print(" | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
