"""Pre-training throughput: preprocessing tokens/s, and training tokens/s and MFU of `pretrain.py`'s path.

Preprocessing: `paddle_glm.preprocess` on a generated corpus (the pre-training demo's documents) with GLM's real
tokenizer (`cog-pretrain.model` from ../shared/assets, else the demo's vocabulary), for each `--workers` value.
Training: `PretrainTrainer` (GLM blank infilling, glm-large-chinese's task mix) on a random GLM of glm-large-chinese's
geometry (hidden 1024, 16 heads, vocab 50048, 1024 positions) cut to `--layers` layers, `--max_seq_length`-token
samples, fp32, Paddle's default math threads; tokens/s counts every input position of a step (part A and part B);
MFU = useful FLOPs (`paddle_glm.flops`: each example up to its last scored position, the vocabulary projection at
scored positions only) / step time / a 2048^3 fp32 `paddle.matmul` peak measured in the same run (best of a
measurement before and after training), over `--steps` steps after `--warmup_steps`; "MFU by CPU time" divides by
the process's CPU seconds instead (one math thread: the time the step really ran while other jobs share the cores).

    python bench/bench_pretrain.py                  # 2-layer glm-large shape, 512-token samples, batch 8
    python bench/bench_pretrain.py --smoke          # seconds: a tiny model, to check that the bench runs
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from typing import Dict, List, Tuple

import numpy as np
import paddle
from paddlenlp.trainer import TrainerCallback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from paddle_glm.args import set_device  # noqa: E402
from paddle_glm.data import write_json_lines  # noqa: E402
from paddle_glm.demo import build_demo_model  # noqa: E402
from paddle_glm.flops import linear_weights, matmul_peak, step_flops  # noqa: E402
from paddle_glm.inputs import Collator  # noqa: E402
from paddle_glm.logs import configure as configure_logs  # noqa: E402
from paddle_glm.models import family_of  # noqa: E402
from paddle_glm.models.glm import GLMConfig, GLMForConditionalGeneration, tokenizer_from_sentencepiece  # noqa: E402
from paddle_glm.preprocess import preprocess  # noqa: E402
from paddle_glm.pretrain import PretrainTrainer, build_dataset, build_objective, parse_arguments  # noqa: E402
from paddle_glm.pretrain_demo import demo_documents  # noqa: E402

COG_MODEL = os.path.join(ROOT, "..", "shared", "assets", "cog-pretrain.model")
LARGE = dict(hidden_size=1024, num_attention_heads=16, vocab_size=50048, max_sequence_length=1024)
TINY = dict(hidden_size=64, num_attention_heads=4, vocab_size=50048, max_sequence_length=256)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max_seq_length", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="Timed training steps.")
    parser.add_argument("--warmup_steps", type=int, default=1)
    parser.add_argument("--documents", type=int, default=20000, help="Documents of the generated corpus.")
    parser.add_argument("--dropout", type=float, default=0.1, help="Embedding, attention and output dropout "
                                                                       "(glm-large-chinese's: 0.1).")
    parser.add_argument("--workers", default="1,2", help="Preprocessing worker counts to time, comma-separated.")
    parser.add_argument("--smoke", action="store_true", help="A tiny model, few documents and steps: seconds.")
    args = parser.parse_args()
    if args.smoke:
        args.max_seq_length, args.batch_size, args.steps, args.warmup_steps = 64, 4, 2, 1
        args.documents, args.workers = 200, "1"
    return args


def write_model(directory: str, corpus: str, shape: dict, layers: int, dropout: float) -> str:
    """A random GLM of `shape` with GLM's tokenizer (or the demo vocabulary trained on `corpus`)."""
    if os.path.isfile(COG_MODEL):
        tokenizer = tokenizer_from_sentencepiece(COG_MODEL)
    else:
        vocabulary = os.path.join(directory, "vocabulary")
        build_demo_model(vocabulary, corpus)
        tokenizer = family_of(vocabulary).load_tokenizer(vocabulary)
    tokenizer.save_pretrained(directory)
    paddle.seed(0)
    config = GLMConfig(num_layers=layers, block_position_encoding=True, output_predict=True, parallel_output=False,
                       embedding_dropout_prob=dropout, attention_dropout_prob=dropout, output_dropout_prob=dropout,
                       **shape)
    GLMForConditionalGeneration(config).save_pretrained(directory)
    return directory


def time_preprocessing(corpus: str, model: str, prefix: str, workers: List[int]) -> Dict[int, dict]:
    return {count: preprocess(corpus, model, f"{prefix}-{count}", workers=count, progress=False) for count in workers}


class StepTimes(TrainerCallback):
    """Wall-clock and this process's CPU time at the end of every step."""

    def __init__(self):
        self.times: List[Tuple[float, float]] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append((time.perf_counter(), time.process_time()))


def time_training(model: str, prefix: str, args, output_dir: str) -> dict:
    steps = args.warmup_steps + args.steps
    flags = ["--model_name_or_path", model, "--data_path", prefix, "--output_dir", output_dir, "--max_steps",
             str(steps), "--per_device_train_batch_size", str(args.batch_size), "--max_seq_length",
             str(args.max_seq_length), "--save_strategy", "no", "--logging_steps", str(steps), "--report_to", "none",
             "--device", "cpu", "--disable_tqdm", "true", "--seed", "1"]
    pretrain_args, training_args = parse_arguments(flags)
    family = family_of(model)
    tokenizer = family.load_tokenizer(model)
    dataset = build_dataset(pretrain_args, build_objective(family, tokenizer, pretrain_args), training_args)
    network = family.model_class.from_pretrained(model)
    trainer = PretrainTrainer(model=network, args=training_args, train_dataset=dataset, tokenizer=tokenizer,
                              data_collator=Collator(family.template(tokenizer).pad_id))
    clock = StepTimes()
    trainer.add_callback(clock)
    start = (time.perf_counter(), time.process_time())
    trainer.train()
    times = [start] + clock.times
    collate = Collator(family.template(tokenizer).pad_id, return_tensors="np")
    config = network.config
    shape = dict(weights=linear_weights(network, config.vocab_size), hidden=config.hidden_size,
                 layers=config.num_layers, vocab=config.vocab_size)
    tokens = flops = 0.0
    for step in range(args.warmup_steps, steps):  # one process: step s trains items [s * B, (s + 1) * B)
        batch = collate([dataset[i] for i in range(step * args.batch_size, (step + 1) * args.batch_size)])
        scored = [np.flatnonzero(row) for row in batch["loss_mask"]]
        tokens += batch["input_ids"].size
        flops += step_flops(lengths=[int(row[-1]) + 1 for row in scored], projected=sum(map(len, scored)), **shape)
    seconds = times[-1][0] - times[args.warmup_steps][0]
    cpu_seconds = times[-1][1] - times[args.warmup_steps][1]
    return {"tokens_per_second": tokens / seconds, "flops_per_second": flops / seconds,
            "seconds_per_step": seconds / args.steps, "flops_per_cpu_second": flops / cpu_seconds}


def main() -> None:
    args = parse_args()
    configure_logs([])
    set_device("cpu")  # as the CLIs do; process settings, so a reference timed here runs with them too
    workers = [int(w) for w in args.workers.split(",")]
    peaks = [matmul_peak(2048)]
    with tempfile.TemporaryDirectory() as root:
        corpus = os.path.join(root, "corpus.jsonl")
        write_json_lines(({"text": text} for text in demo_documents(args.documents, seed=0)), corpus)
        model = write_model(os.path.join(root, "model"), corpus, TINY if args.smoke else LARGE, args.layers,
                            args.dropout)
        prep = time_preprocessing(corpus, model, os.path.join(root, "corpus"), workers)
        train = time_training(model, os.path.join(root, f"corpus-{workers[0]}"), args, os.path.join(root, "run"))
    peaks.append(matmul_peak(2048))
    peak = max(peaks)
    threads = paddle.get_flags(["FLAGS_paddle_num_threads"])["FLAGS_paddle_num_threads"]
    tokenizer = "cog-pretrain.model (glm-large-chinese)" if os.path.isfile(COG_MODEL) else "the demo vocabulary"
    measured = ", ".join(f"{p / 1e9:.1f}" for p in peaks)
    print(f"\n`python bench/bench_pretrain.py{' --smoke' if args.smoke else ''}` ({datetime.date.today()}; CPU, "
          f"{os.cpu_count()} cores, {threads} Paddle math thread(s), fp32; peak {measured} GFLOP/s, 2048^3 matmul "
          "before / after)\n")
    print(f"| preprocessing ({tokenizer}, {args.documents} documents) | workers | docs/s | tokens/s |")
    print("|---|---|---|---|")
    for count, result in prep.items():
        print(f"| {result['tokens']} tokens | {count} | {result['documents_per_second']:.0f} | "
              f"{result['tokens_per_second']:.0f} |")
    shape = "tiny (hidden 64)" if args.smoke else "glm-large shape"
    print(f"\n| training: {shape}, {args.layers} layers, {args.max_seq_length}-token samples, batch {args.batch_size} "
          f"(dropout {args.dropout:g}) | s/step | tokens/s | useful GFLOP/s | MFU | MFU by CPU time |")
    print("|---|---|---|---|---|---|")
    print(f"| mean of {args.steps} steps after {args.warmup_steps} warm-up | {train['seconds_per_step']:.2f} | "
          f"{train['tokens_per_second']:.0f} | {train['flops_per_second'] / 1e9:.1f} | "
          f"{100 * train['flops_per_second'] / peak:.1f}% | {100 * train['flops_per_cpu_second'] / peak:.1f}% |")
    print(f"\nload average (1, 5, 15 min) at the end: {', '.join(f'{v:.1f}' for v in os.getloadavg())}; MFU by CPU "
          "time divides by this process's CPU seconds instead of wall-clock seconds (with one math thread, what the "
          "step really ran when other jobs share the cores)")


if __name__ == "__main__":
    main()
