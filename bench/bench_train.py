"""Training throughput: our fine-tuning path against PaddleNLP's GLM in PaddleNLP's Trainer, same run.

Ours: `paddle_glm.models.glm.GLMForConditionalGeneration` trained by `paddle_glm.trainer.GLMTrainer`, fed by
`Collator` (each batch padded to its own longest example, part-A length as a 1-D mask) and projecting
to the vocabulary only at target positions (`loss_positions_only`, as `GLMTrainer.compute_loss` asks).
Reference: PaddleNLP's `GLMForConditionalGeneration` in `paddlenlp.trainer.Trainer` with the reference
example's inputs (`paddle_glm.models.glm.padded_training_example`): every example padded to src_length + tgt_length,
a dense [1, S, S] attention mask as its tokenizer's `build_inputs_for_generation` makes it, logits at every
position, loss with `loss_mask` (`DefaultDataCollator`, as the example). Both: same random weights (state
dict copied), same synthetic examples in the same order, same batch size and the example's optimisation flags
(AdamW, lr 3e-5, warm-up 0.06, weight decay 0.1, grad-norm clip 1.0); fp32 on CPU (the example's
--fp16/--recompute are GPU settings).

Throughput is target tokens (sum of loss_mask) and samples per second over `--steps` steps after
`--warmup_steps`, best of `--repeats` rounds (the two paths alternate, so background load hits both).
MFU divides USEFUL model FLOPs (each example unpadded, vocabulary projection at target positions only,
the same numerator for both paths) by a peak measured here (a 2048^3 fp32 paddle.matmul); each path's
executed FLOPs are printed too. Before timing, both paths' losses on the first batch are compared.

    python bench/bench_train.py                              # large (2 layers) + tiny, reference + short mixes
    python bench/bench_train.py --models large --mixes reference --layers 4 --steps 6
    python bench/bench_train.py --smoke                      # seconds: the tiny model, one step
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import paddle
from paddlenlp.data import DefaultDataCollator
from paddlenlp.trainer import Trainer, TrainerCallback, TrainingArguments
from paddlenlp.transformers import GLMConfig
from paddlenlp.transformers import GLMForConditionalGeneration as PaddleNLPGLM
from paddlenlp.utils.log import logger

from paddle_glm.args import set_device
from paddle_glm.demo import DEMO_MODEL_CONFIG
from paddle_glm.inputs import Collator
from paddle_glm.models.glm import GLMSpecialIds, GLMTemplate, padded_training_example
from paddle_glm.models.glm import GLMForConditionalGeneration
from paddle_glm.trainer import GLMTrainer

# Model shapes; special ids sit after the text vocabulary as in GLM's Chinese tokenizer (offset + 0, 2, 6, 7, 9).
MODELS = {
    "large": dict(hidden_size=1024, num_attention_heads=16, vocab_size=50048, text_vocab=50000,
                  embedding_dropout_prob=0.1, attention_dropout_prob=0.1, output_dropout_prob=0.1),
    "tiny": dict({k: v for k, v in DEMO_MODEL_CONFIG.items() if k not in ("output_predict", "parallel_output")},
                 vocab_size=1520, text_vocab=1500),  # the demo's model (demo vocabulary of 1,500 + specials)
}
# Synthetic data: (source tokens incl. [CLS] [gMASK] <eos>) and (target tokens), uniform in these ranges.
MIXES = {
    "reference": dict(source=(500, 608), target=(60, 158)),  # DuReaderQG-like at the reference's 608 + 160
    "short": dict(source=(30, 200), target=(8, 38)),  # short instructions/questions; reference still pads to 768
    "short-fit": dict(source=(30, 200), target=(8, 38), budgets=(200, 40)),  # ... with budgets fitted to the data
}
BATCH = {"large": 2, "tiny": 16}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="large,tiny",
                        help="comma-separated: large (glm-large-chinese geometry, --layers deep), "
                             "tiny (the demo model)")
    parser.add_argument("--mixes", default="reference,short",
                        help=f"comma-separated data mixes: {', '.join(MIXES)} (short-fit: the reference padded "
                             "only to 200 + 40, budgets fitted to the short data)")
    parser.add_argument("--layers", type=int, default=2,
                        help="transformer layers of the large model (glm-large-chinese: 24)")
    parser.add_argument("--src_length", type=int, default=608, help="reference source budget (its --src_length)")
    parser.add_argument("--tgt_length", type=int, default=160, help="reference target budget (its --tgt_length)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="per-step batch for every model (default: 2 for large, as the example; 16 for tiny)")
    parser.add_argument("--label_smoothing", type=float, default=0.0,
                        help="label smoothing of both losses; PaddleNLP's smoothed loss only broadcasts at batch 1, "
                             "so values > 0 need --batch_size 1 (the example's 0.1 cannot run at its batch 2); "
                             "slow: PaddleNLP's then calls Paddle's CPU log_softmax on [768, 50048] logits, "
                             "minutes per step")
    parser.add_argument("--warmup_steps", type=int, default=1, help="untimed steps at the start of every round")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round (one epoch of distinct batches)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds per path; the best round counts")
    parser.add_argument("--loss_tolerance", type=float, default=1e-4, help="max relative first-batch loss difference")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also profile N steps of our path (first model and mix) and print the top ops")
    parser.add_argument("--threads", type=int, default=0,
                        help="Paddle CPU math threads (paddle.base.core.set_num_threads); 0 keeps Paddle's default "
                             "(FLAGS_paddle_num_threads, 1), which is what the fine-tuning scripts run with")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and data")
    parser.add_argument("--smoke", action="store_true",
                        help="the tiny model, short-fit data, batch 2, 1 round of 1 step: seconds (a test runs it)")
    args = parser.parse_args()
    args.models, args.mixes = args.models.split(","), args.mixes.split(",")
    if args.smoke:
        args.models, args.mixes, args.batch_size, args.steps, args.repeats = ["tiny"], ["short-fit"], 2, 1, 1
    for name in args.models:
        if name not in MODELS:
            parser.error(f"--models: unknown {name!r}; choose from {', '.join(MODELS)}")
    for name in args.mixes:
        if name not in MIXES:
            parser.error(f"--mixes: unknown {name!r}; choose from {', '.join(MIXES)}")
    if args.label_smoothing > 0 and args.batch_size != 1:
        parser.error("--label_smoothing > 0 needs --batch_size 1: PaddleNLP's smoothed GLM loss fails to broadcast "
                     "for larger batches")
    return args


# ------------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Case:
    """One row of the table: a model shape, a data mix, the batch and the reference's padding budgets."""

    model: str
    mix: str
    batch: int
    src_length: int
    tgt_length: int
    layers: int

    @property
    def name(self) -> str:
        model = f"large ({self.layers} layers)" if self.model == "large" else "tiny (demo)"
        return f"{model}, {self.mix} ({self.src_length}+{self.tgt_length}), batch {self.batch}"


def template_for(text_vocab: int) -> GLMTemplate:
    """GLM's template over a vocabulary of `text_vocab` pieces followed by GLM's special tokens."""
    pad = text_vocab  # <|endoftext|> is also the pad token
    special = GLMSpecialIds(pad=pad, cls=pad + 2, eos=pad, sop=pad + 6, eop=pad + 7, gmask=pad + 9, mask_ids=(pad + 9,))
    return GLMTemplate(None, special)


def synthetic_pairs(case: Case, count: int, text_vocab: int, seed: int) -> List[Tuple[List[int], List[int]]]:
    """(source text ids, target ids) with lengths uniform in the mix's ranges, within the budgets."""
    rng = np.random.default_rng(seed)
    mix = MIXES[case.mix]
    pairs = []
    for _ in range(count):
        source = int(rng.integers(mix["source"][0], min(mix["source"][1], case.src_length) + 1))
        target = int(rng.integers(mix["target"][0], min(mix["target"][1], case.tgt_length - 2) + 1))
        text, target_ids = rng.integers(100, text_vocab, source - 3), rng.integers(100, text_vocab, target)
        pairs.append((text.tolist(), target_ids.tolist()))
    return pairs


class ListDataset(paddle.io.Dataset):
    def __init__(self, features: List[dict]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict:
        return self.features[index]


# ------------------------------------------------------------------------------------------------ models


def build_models(case: Case, label_smoothing: float, seed: int):
    """(ours, reference, config dict) with identical random weights."""
    shape = {k: v for k, v in MODELS[case.model].items() if k != "text_vocab"}
    shape["num_layers"] = case.layers
    # Position tables must cover the reference's padded length (the demo's 256 is too short for 768).
    shape["max_sequence_length"] = max(shape.get("max_sequence_length", 1024), case.src_length + case.tgt_length)
    paddle.seed(seed)
    config = GLMConfig(**shape, output_predict=True, parallel_output=False, label_smoothing=label_smoothing)
    reference = PaddleNLPGLM(config)
    ours = GLMForConditionalGeneration(GLMConfig(**config.to_dict()))
    ours.set_state_dict(reference.state_dict())
    return ours, reference, shape


def first_batch_losses(ours, reference, our_batch: dict, reference_batch: dict, label_smoothing: float):
    """Both losses on one batch, dropout off, computed as each trainer's compute_loss calls the model."""
    ours.eval()
    reference.eval()
    with paddle.no_grad():
        our_loss = ours(**our_batch, label_smoothing=label_smoothing, loss_positions_only=True).loss
        reference_loss = reference(**reference_batch)[0]
    ours.train()
    reference.train()
    return float(our_loss), float(reference_loss)


# ------------------------------------------------------------------------------------------------ timing


class StepClock(TrainerCallback):
    """Wall-clock time at the start of training and at the end of every optimizer step."""

    def __init__(self):
        self.ends: List[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.ends = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


class InOrder:
    """Batches in dataset order, so both paths train on the same batches in the same steps."""

    def _get_train_sampler(self):
        return paddle.io.BatchSampler(dataset=self.train_dataset, shuffle=False,
                                      batch_size=self.args.per_device_train_batch_size)


class OurTrainer(InOrder, GLMTrainer):
    pass


class ReferenceTrainer(InOrder, Trainer):
    pass


def training_arguments(output_dir: str, batch: int, max_steps: int, seed: int) -> TrainingArguments:
    """The reference example's optimisation flags; no logging, saving or evaluation in the timed loop."""
    return TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=batch, max_steps=max_steps, learning_rate=3e-5,
        warmup_ratio=0.06, weight_decay=0.1, max_grad_norm=1.0, lr_scheduler_type="linear", seed=seed,
        logging_steps=10 ** 6, save_strategy="no", evaluation_strategy="no", disable_tqdm=True, report_to=["none"],
        device="cpu", dataloader_num_workers=0,
    )


def timed_round(make_trainer, steps: int, warmup: int) -> Tuple[float, float]:
    """(seconds of `steps` optimizer steps after `warmup` untimed ones, seconds of the warm-up), fresh trainer.

    The clock runs from one step's end to another's, so the data loading, the trainer's bookkeeping and the
    optimizer update are all inside."""
    clock = StepClock()
    trainer = make_trainer(warmup + steps)
    trainer.add_callback(clock)
    trainer.train()
    return clock.ends[warmup + steps] - clock.ends[warmup], clock.ends[warmup] - clock.ends[0]


def trainer_factories(case: Case, ours, reference, our_data, reference_data, args, output_dir: str):
    """Two functions max_steps -> a fresh trainer: ours (GLMTrainer) and the reference (PaddleNLP's Trainer)."""
    pad = template_for(MODELS[case.model]["text_vocab"]).pad_id

    def our_trainer(max_steps: int):
        return OurTrainer(model=ours, args=training_arguments(output_dir, case.batch, max_steps, args.seed),
                          train_dataset=our_data, data_collator=Collator(pad),
                          label_smoothing=args.label_smoothing)

    def reference_trainer(max_steps: int):
        return ReferenceTrainer(model=reference,
                                args=training_arguments(output_dir, case.batch, max_steps, args.seed),
                                train_dataset=reference_data, data_collator=DefaultDataCollator())

    return our_trainer, reference_trainer


# ------------------------------------------------------------------------------------------------- FLOPs


def model_flops(hidden: int, layers: int, vocab: int, lengths: List[int], projected: int) -> float:
    """Forward + backward FLOPs (3 x forward) of one step.

    Per token 24 h^2 per layer (QKV, output, MLP: 12 h^2 weights, 2 FLOPs each), per (query, key) pair
    4 h per layer (scores and weighted values, full S x S as both paths compute), per projected position
    2 h V (the tied vocabulary projection). `lengths`: the processed length of each example.
    """
    tokens = sum(lengths)
    pairs = sum(length * length for length in lengths)
    forward = layers * (24 * hidden * hidden * tokens + 4 * hidden * pairs) + 2 * hidden * vocab * projected
    return 3.0 * forward


def case_flops(case: Case, shape: dict, our_features: List[dict]) -> Dict[str, float]:
    """Per-step FLOPs, averaged over the epoch: useful (unpadded), ours (batch-padded), reference (768-padded)."""
    h, layers, vocab = shape["hidden_size"], shape["num_layers"], shape["vocab_size"]
    totals = {"useful": 0.0, "ours": 0.0, "reference": 0.0}
    batches = [our_features[i:i + case.batch] for i in range(0, len(our_features), case.batch)]
    for batch in batches:
        lengths = [len(f["input_ids"]) for f in batch]
        targets = int(sum(f["loss_mask"].sum() for f in batch))
        totals["useful"] += model_flops(h, layers, vocab, lengths, targets)
        totals["ours"] += model_flops(h, layers, vocab, [max(lengths)] * len(batch), targets)
        full = case.src_length + case.tgt_length
        totals["reference"] += model_flops(h, layers, vocab, [full] * len(batch), full * len(batch))
    return {key: value / len(batches) for key, value in totals.items()}


def peak_flops(size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a size^3 fp32 paddle.matmul on this machine, best of `repeats`."""
    a = paddle.randn([size, size], dtype="float32")
    b = paddle.randn([size, size], dtype="float32")
    paddle.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        float(paddle.matmul(a, b)[0, 0])
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best


# ----------------------------------------------------------------------------------------------- profile


def profile_ours(make_trainer, steps: int, warmup: int, top: int = 12) -> None:
    """Profile `steps` steps of our path (after `warmup`) and print where the time goes, kernels first."""
    import paddle.profiler as profiler

    class Stepper(TrainerCallback):
        def __init__(self, prof):
            self.prof = prof

        def on_step_end(self, args, state, control, **kwargs):
            self.prof.step()

    with tempfile.TemporaryDirectory(prefix="bench_train_profile_") as trace_dir:
        prof = profiler.Profiler(targets=[profiler.ProfilerTarget.CPU], scheduler=(warmup, warmup + steps),
                                 on_trace_ready=profiler.export_chrome_tracing(trace_dir))
        trainer = make_trainer(warmup + steps + 1)
        trainer.add_callback(Stepper(prof))
        prof.start()
        trainer.train()
        prof.stop()
        trace = max((os.path.join(trace_dir, f) for f in os.listdir(trace_dir)), key=os.path.getmtime)
        with open(trace) as handle:
            events = [e for e in json.load(handle)["traceEvents"] if e.get("ph") == "X"]
    print_profile(events, steps, top)


def print_profile(events: List[dict], steps: int, top: int) -> None:
    """Per-step time of the training phases and of the kernels that take the most (chrome-trace events)."""
    def per_step(selected) -> float:  # ms per step
        return sum(e["dur"] for e in selected) / steps / 1e3

    def phase(category: str, name_part: str = "") -> float:
        return per_step(e for e in events if e.get("cat") == category and name_part in e["name"])

    kernels: Dict[str, List[dict]] = {}
    for event in events:
        if event.get("cat") == "DygraphKernelLaunch":
            name = re.sub(r"\[[^\]]*\]$", "", event["name"]).replace(" kernel launch", "").strip()
            kernels.setdefault(name, []).append(event)
    step = phase("ProfileStep")
    # Forward events nest (model, stack, block, ...): the outermost one is the model's.
    forward = phase("Forward", "ForConditional")
    print(f"\nour path profiled over {steps} steps: {step:.0f} ms/step; forward {forward:.0f}, "
          f"backward {phase('Backward'):.0f}, optimizer {phase('Optimization'):.0f}, data {phase('Dataloader'):.0f}; "
          f"all kernels {sum(per_step(k) for k in kernels.values()):.0f}")
    print("| kernel | calls/step | ms/step | % of step |\n|---|---|---|---|")
    for name, launches in sorted(kernels.items(), key=lambda kv: -per_step(kv[1]))[:top]:
        ms = per_step(launches)
        print(f"| {name} | {len(launches) / steps:.0f} | {ms:.1f} | {100 * ms / step:.1f}% |")


# -------------------------------------------------------------------------------------------------- main


def prepare_data(case: Case, args):
    """The same synthetic examples in both layouts: (ours, reference) datasets of one epoch of `--steps` batches."""
    text_vocab = MODELS[case.model]["text_vocab"]
    template = template_for(text_vocab)
    pairs = synthetic_pairs(case, args.steps * case.batch, text_vocab, args.seed)
    sources = [template.render_cut(text, case.src_length - 3) for text, _ in pairs]
    return (ListDataset([template.training_example(s, g, case.tgt_length) for s, (_, g) in zip(sources, pairs)]),
            ListDataset([padded_training_example(template, s, g, case.src_length, case.tgt_length)
                         for s, (_, g) in zip(sources, pairs)]))


def time_paths(our_trainer, reference_trainer, args) -> Dict[str, list]:
    """`--repeats` rounds of each path, alternating: {path: [(timed seconds, warm-up seconds), ...]}."""
    rounds = {"reference": [], "ours": []}
    for _ in range(args.repeats):
        rounds["reference"].append(timed_round(reference_trainer, args.steps, args.warmup_steps))
        rounds["ours"].append(timed_round(our_trainer, args.steps, args.warmup_steps))
    return rounds


def summarize(case: Case, rounds: Dict[str, list], flops: Dict[str, float], targets: float, args) -> dict:
    result = {}
    for path, measured in rounds.items():
        seconds = min(timed for timed, _ in measured)
        step = seconds / args.steps
        result[path] = {
            "step_s": step, "tokens_s": targets / seconds, "samples_s": args.steps * case.batch / seconds,
            "useful_flops_s": flops["useful"] / step, "executed_flops_s": flops[path] / step,
            "rounds": [timed / args.steps for timed, _ in measured],
            "warmup": [warm / max(args.warmup_steps, 1) for _, warm in measured],
        }
    return result


def run_case(case: Case, args) -> dict:
    """Loss check, timing (and profile) of one model / data mix; prints its details, returns its row."""
    ours, reference, shape = build_models(case, args.label_smoothing, args.seed)
    our_data, reference_data = prepare_data(case, args)
    pad = template_for(MODELS[case.model]["text_vocab"]).pad_id
    first = slice(0, case.batch)
    losses = first_batch_losses(ours, reference, Collator(pad)(our_data.features[first]),
                                DefaultDataCollator()(reference_data.features[first]), args.label_smoothing)
    flops = case_flops(case, shape, our_data.features)
    targets = float(sum(f["loss_mask"].sum() for f in our_data.features))
    with tempfile.TemporaryDirectory(prefix="bench_train_") as output_dir:
        our_trainer, reference_trainer = trainer_factories(case, ours, reference, our_data, reference_data, args,
                                                           output_dir)
        result = summarize(case, time_paths(our_trainer, reference_trainer, args), flops, targets, args)
        result.update(case=case, flops=flops, loss=(*losses, abs(losses[0] - losses[1]) / abs(losses[1])))
        print_case(result, args.loss_tolerance)
        if args.profile:
            profile_ours(our_trainer, args.profile, args.warmup_steps)
            args.profile = 0  # the first case only
    return result


def print_case(result: dict, tolerance: float) -> None:
    case, (ours, reference, relative) = result["case"], result["loss"]
    verdict = "OK" if relative <= tolerance else "MISMATCH"
    print(f"\n{case.name}: first-batch loss ours {ours:.6f} PaddleNLP {reference:.6f} "
          f"(rel. diff {relative:.1e}, {verdict})")
    flops = result["flops"]
    print(f"  GFLOP/step: useful {flops['useful'] / 1e9:.1f}, ours {flops['ours'] / 1e9:.1f}, "
          f"PaddleNLP {flops['reference'] / 1e9:.1f} (PaddleNLP / ours = {flops['reference'] / flops['ours']:.2f}x: "
          f"the speed-up at equal FLOP/s)")
    for path in ("reference", "ours"):
        r = result[path]
        print(f"  {path:<9} {r['step_s']:.3f} s/step, {r['tokens_s']:.1f} target tokens/s, "
              f"{r['samples_s']:.2f} samples/s, {r['useful_flops_s'] / 1e9:.1f} useful / "
              f"{r['executed_flops_s'] / 1e9:.1f} executed GFLOP/s; s/step per round "
              f"{', '.join(f'{s:.2f}' for s in r['rounds'])}, warm-up {', '.join(f'{s:.2f}' for s in r['warmup'])}")
    sys.stdout.flush()


def print_table(results: List[dict], args, peak: float) -> None:
    command = "python bench/bench_train.py" + "".join(" " + shlex.quote(a) for a in sys.argv[1:])
    print(f"\n`{command}` ({datetime.date.today()}; CPU, {os.cpu_count()} cores, {args.threads} Paddle math "
          f"thread(s), fp32; large = glm-large-chinese geometry (hidden 1024, 16 heads, vocab 50048) cut to "
          f"{args.layers} layers, tiny = the demo model; label smoothing {args.label_smoothing}; target tokens/s, "
          f"best of {args.repeats} x {args.steps} steps after {args.warmup_steps} warm-up; MFU = useful FLOPs "
          f"(unpadded examples, vocabulary projection at targets only: the same numerator for both) / time / "
          f"{peak / 1e9:.0f} GFLOP/s, a 2048^3 fp32 paddle.matmul here)\n")
    print("| model, data (reference budget), batch | PaddleNLP tokens/s | ours tokens/s | speed-up "
          "| PaddleNLP samples/s | ours samples/s | MFU PaddleNLP | MFU ours | first-batch loss rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        ref, ours = r["reference"], r["ours"]
        print(f"| {r['case'].name} | {ref['tokens_s']:.1f} | {ours['tokens_s']:.1f} "
              f"| {ours['tokens_s'] / ref['tokens_s']:.2f}x | {ref['samples_s']:.2f} | {ours['samples_s']:.2f} "
              f"| {100 * ref['useful_flops_s'] / peak:.1f}% | {100 * ours['useful_flops_s'] / peak:.1f}% "
              f"| {r['loss'][2]:.1e} |")


def main() -> None:
    args = parse_args()
    logger.set_level("WARNING")
    set_device("cpu")  # as the CLIs do; process settings, so a reference timed here runs with them too
    if args.threads:
        paddle.base.core.set_num_threads(args.threads)
    args.threads = args.threads or paddle.get_flags(["FLAGS_paddle_num_threads"])["FLAGS_paddle_num_threads"]
    peaks = [peak_flops()]  # measured again after every case: the best counts (other processes may share the CPU)
    results = []
    for model in args.models:
        for mix in args.mixes:
            src, tgt = MIXES[mix].get("budgets", (args.src_length, args.tgt_length))
            layers = args.layers if model == "large" else MODELS[model]["num_layers"]
            results.append(run_case(Case(model, mix, args.batch_size or BATCH[model], src, tgt, layers), args))
            peaks.append(peak_flops())
    print(f"\npeak: {', '.join(f'{p / 1e9:.1f}' for p in peaks)} GFLOP/s (2048^3 fp32 paddle.matmul, best of 10; "
          f"{args.threads} thread(s)): the best counts")
    print_table(results, args, max(peaks))
    if any(r["loss"][2] > args.loss_tolerance for r in results):
        sys.exit("error: a first-batch loss differs beyond --loss_tolerance")


if __name__ == "__main__":
    main()
