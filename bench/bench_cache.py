"""Decoding speed with our K/V cache against PaddleNLP's GLM `generate`, same weights, same run.

PaddleNLP's GLM caches each layer's input hidden states and re-projects Q/K/V over the whole
prefix at every step; ours projects only the new token. Both decode greedily (and with beams)
from the same prompts; the script checks they produce the same tokens, then prints tokens/s and
the ratio. Random weights with glm-large-chinese geometry (hidden 1024, 16 heads, vocab 50048),
layers configurable so it runs on a laptop CPU in minutes.

    python bench/bench_cache.py                # 4 layers, prompt 128, 32 new tokens
    python bench/bench_cache.py --quick        # 2 layers, prompt 64, 16 new tokens (the README demo)
    python bench/bench_cache.py --smoke        # 1 layer, prompt 16, 4 new tokens: seconds
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import paddle
from paddlenlp.transformers import GLMConfig
from paddlenlp.transformers import GLMForConditionalGeneration as PaddleNLPGLM

from paddle_glm.decoding import DecodingConfig
from paddle_glm.generation import generate
from paddle_glm.models.glm import GLMForConditionalGeneration, GLMSpecialIds, GLMTemplate

# Special ids on glm-large-chinese's vocabulary (see paddle_glm.models.glm).
PAD, CLS, SOP, EOP, GMASK = 50000, 50002, 50006, 50007, 50009
TEMPLATE = GLMTemplate(None, GLMSpecialIds(pad=PAD, cls=CLS, eos=PAD, sop=SOP, eop=EOP, gmask=GMASK, mask_ids=(GMASK,)))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="transformer layers (glm-large-chinese has 24)")
    parser.add_argument("--prompt_length", type=int, default=128, help="source tokens per prompt")
    parser.add_argument("--new_tokens", type=int, default=32, help="tokens generated per prompt")
    parser.add_argument("--batch_size", type=int, default=1, help="prompts decoded together")
    parser.add_argument("--num_beams", type=int, default=1, help="1 = greedy search, >1 = beam search")
    parser.add_argument("--quick", action="store_true", help="2 layers, prompt 64, 16 new tokens")
    parser.add_argument("--smoke", action="store_true", help="1 layer, prompt 16, 4 new tokens: seconds (a test "
                                                             "runs it)")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.prompt_length, args.new_tokens = 2, 64, 16
    if args.smoke:
        args.layers, args.prompt_length, args.new_tokens = 1, 16, 4
    return args


def build_models(layers: int):
    paddle.seed(0)
    config = GLMConfig(
        num_layers=layers, vocab_size=50048, hidden_size=1024, num_attention_heads=16, max_sequence_length=1024,
        output_predict=True, parallel_output=False,
    )
    reference = PaddleNLPGLM(config)
    ours = GLMForConditionalGeneration(GLMConfig(**config.to_dict()))
    ours.set_state_dict(reference.state_dict())
    reference.eval()
    ours.eval()
    return ours, reference


def prompts(batch_size: int, length: int):
    rng = np.random.default_rng(0)
    sources = [[CLS] + rng.integers(100, 40000, length - 3).tolist() + [GMASK, PAD] for _ in range(batch_size)]
    ours = [TEMPLATE.generation_example(s) for s in sources]
    return sources, ours, length - 2


def reference_inputs(sources, mask_pos: int, new_tokens: int):
    """PaddleNLP's generation inputs: full-length positions and mask, as its tokenizer builds them."""
    batch, length = len(sources), len(sources[0])
    ids = paddle.to_tensor([s + [SOP] for s in sources], dtype="int64")
    total = length + new_tokens + 1
    rows = list(range(length)) + [mask_pos] * (new_tokens + 1)
    blocks = [0] * length + list(range(1, new_tokens + 2))
    position_ids = paddle.to_tensor([[rows, blocks]] * batch, dtype="int64")
    mask = np.tril(np.ones([total, total], dtype="float32"))
    mask[:, :length] = 1.0
    attention_mask = paddle.to_tensor(np.broadcast_to(mask, [batch, 1, total, total]).copy())
    return ids, position_ids, attention_mask


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    args = parse_args()
    ours, reference = build_models(args.layers)
    sources, our_prompts, mask_pos = prompts(args.batch_size, args.prompt_length)
    strategy = "beam_search" if args.num_beams > 1 else "greedy_search"
    config = DecodingConfig(
        decode_strategy=strategy, num_beams=args.num_beams, max_length=args.new_tokens,
        min_length=args.new_tokens, eos_token_id=EOP, pad_token_id=PAD,
    )
    ids, position_ids, attention_mask = reference_inputs(sources, mask_pos, args.new_tokens)
    with paddle.no_grad():
        (expected, _), reference_seconds = timed(lambda: reference.generate(
            input_ids=ids, position_ids=position_ids, attention_mask=attention_mask, decode_strategy=strategy,
            num_beams=args.num_beams, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
            eos_token_id=EOP, pad_token_id=PAD, use_cache=True,
        ))
    result, our_seconds = timed(lambda: generate(ours, our_prompts, config))
    same = [list(map(int, row[: args.new_tokens])) for row in expected.numpy()] == result.sequences
    tokens = args.batch_size * args.new_tokens
    print(
        f"GLM {args.layers} layers x hidden 1024, vocab 50048 | batch {args.batch_size}, prompt {args.prompt_length}, "
        f"{args.new_tokens} new tokens, {strategy} (beams {args.num_beams}) | CPU, fp32"
    )
    print(f"{'':<30}{'tokens/s':>10}")
    print(f"{'PaddleNLP generate (dygraph)':<30}{tokens / reference_seconds:>10.1f}")
    print(f"{'paddle_glm with K/V cache':<30}{tokens / our_seconds:>10.1f}")
    print(f"speed-up: {reference_seconds / our_seconds:.1f}x   same tokens as PaddleNLP: {same}")


if __name__ == "__main__":
    main()
