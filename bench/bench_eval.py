"""Benchmark scoring speed: shared-prefix caching against scoring every (item, choice) whole, same run.

A 2-layer GLM with glm-large-chinese geometry (hidden 1024, 16 heads, vocab 50048, random weights) scores generated
5-shot MMLU-shaped prompts (a header and 5 solved examples shared by a subject's items, then the question; 4 one-token
answers " A" ... " D") with `paddle_glm.scoring.Scorer`, once with `shared_prefix=True` (each item's prompt runs once
for its 4 choices; GLM's bidirectional prompts allow no sharing across items) and once without (4 full forwards per
item). Both score the same items in batches of the same number of rows; the script checks that they agree and
prints items/s and the ratio.

    python bench/bench_eval.py            # 16 items, 5 shots
    python bench/bench_eval.py --smoke    # 2 items, 1 shot: seconds
"""
from __future__ import annotations

import argparse
import time
from typing import List

import numpy as np
import paddle

from paddle_glm.args import set_device
from paddle_glm.models.glm import GLMConfig, GLMForConditionalGeneration, GLMSpecialIds, GLMTemplate
from paddle_glm.scoring import Request, Scorer

# glm-large-chinese's special ids (vocabulary of 50000 pieces + specials, see paddle_glm.models.glm)
PAD, CLS, SOP, EOP, GMASK = 50000, 50002, 50006, 50007, 50009
TEMPLATE = GLMTemplate(None, GLMSpecialIds(pad=PAD, cls=CLS, eos=PAD, sop=SOP, eop=EOP, gmask=GMASK, mask_ids=(GMASK,)))
ANSWERS = [[196], [415], [228], [424]]  # " A" ... " D" in cog-pretrain.model (one piece each)
ANSWER_PROMPT = [9558, 18657, 41, 43383]  # "Answer:"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="transformer layers (glm-large-chinese has 24)")
    parser.add_argument("--items", type=int, default=16, help="items of the subject scored")
    parser.add_argument("--shots", type=int, default=5, help="solved examples before each item")
    parser.add_argument("--batch_size", type=int, default=8, help="rows per forward, both ways")
    parser.add_argument("--smoke", action="store_true", help="2 items, 1 shot (a test runs it)")
    args = parser.parse_args()
    if args.smoke:
        args.items, args.shots = 2, 1
    return args


def mmlu_shaped_requests(items: int, shots: int, seed: int = 0) -> List[Request]:
    """A subject's items: header (~20 tokens) + shots (~110 each) shared, then a question (~60-140) + "Answer:"."""
    rng = np.random.default_rng(seed)
    words = lambda n: [int(t) for t in rng.integers(100, 50000, n)]  # noqa: E731
    solved = lambda: words(int(rng.integers(80, 140))) + ANSWER_PROMPT + ANSWERS[int(rng.integers(4))]  # noqa: E731
    shared = words(20) + [token for _ in range(shots) for token in solved()]
    return [Request(TEMPLATE.render_cut(shared + words(int(rng.integers(60, 140))) + ANSWER_PROMPT, None), ANSWERS)
            for _ in range(items)]


def timed(scorer: Scorer, requests: List[Request]):
    started = time.perf_counter()
    scores = scorer.score(requests)
    return scores, time.perf_counter() - started


def main() -> None:
    args = parse_args()
    set_device("cpu")  # as the CLIs do; process settings, so a reference timed here runs with them too
    paddle.seed(0)
    config = GLMConfig(num_layers=args.layers, vocab_size=50048, hidden_size=1024, num_attention_heads=16,
                       max_sequence_length=1024, output_predict=True, parallel_output=False)
    model = GLMForConditionalGeneration(config)
    model.eval()
    requests = mmlu_shaped_requests(args.items, args.shots)
    tokens = np.mean([len(r.prompt_ids) for r in requests])
    shared, each = Scorer(model, TEMPLATE, args.batch_size, True), Scorer(model, TEMPLATE, args.batch_size, False)
    shared.score(requests[:1])  # warm-up
    each.score(requests[:1])
    scores_shared, seconds_shared = timed(shared, requests)
    scores_each, seconds_each = timed(each, requests)
    difference = float(np.abs(np.array(scores_shared) - np.array(scores_each)).max())
    print(f"{args.layers}-layer glm-large shape, {args.items} items x 4 choices, {args.shots}-shot prompts of "
          f"{tokens:.0f} tokens on average, {args.batch_size} rows per forward, {paddle.get_device()}")
    print(f"shared-prefix cache: {args.items / seconds_shared:8.2f} items/s ({seconds_shared:.2f} s)")
    print(f"per-choice scoring:  {args.items / seconds_each:8.2f} items/s ({seconds_each:.2f} s)")
    print(f"shared-prefix / per-choice: {seconds_each / seconds_shared:.2f}x (log-likelihoods agree within "
          f"{difference:.1e})")
    if difference > 1e-3:
        raise SystemExit(f"the two ways disagree by {difference}")


if __name__ == "__main__":
    main()
