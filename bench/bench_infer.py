"""Serving speed of the exported runner: decode time per step next to the memory-bandwidth bound, the prompt pass
timed apart, resident memory, weight-only int8/int4, and the tokens checked against the dynamic graph.

Random weights with glm-large-chinese geometry (hidden 1024, 16 heads, vocab 50048), layers configurable. A decode
step must read every weight a step multiplies by (the linear layers and the tied 50048 x 1024 output projection;
not the embedding tables, read one row per token), so its time is bounded below by those bytes divided by the
bandwidth a large GEMV reads memory at here (measured in the same run): "bound" below, recomputed from the
quantized bytes for int8/int4. Each row times the prompt pass ("prefill") and the decode steps apart (the decode
includes decoding's own work between steps, as a caller sees it) and gives the step time as a share of the bound.
"same tokens": the runner's sequences equal the dynamic graph's (fp32), or the share equal to the fp32 runner's
(int8/int4). Memory: what loading the runner and decoding one prompt adds to a fresh process's resident set,
measured in a subprocess, against 1.2 x the weight bytes + the cache.

    python bench/bench_infer.py --quality                  # 2 layers: prompt 128 x batch 1/8, beams; int8, int4
    python bench/bench_infer.py --layers 6 --grid beams --quant ''   # prompt 608: 5 beams against greedy
    python bench/bench_infer.py --smoke                    # a tiny model, seconds (tests/test_bench.py runs it)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

GRIDS = {
    # (prompt length, batch, beams)
    "default": [(128, 1, 1), (128, 8, 1), (128, 1, 5)],
    "beams": [(608, 1, 1), (608, 1, 5)],
    "full": [(p, b, k) for p in (128, 608) for b in (1, 8) for k in (1, 5)],
    "smoke": [(16, 1, 1), (16, 2, 2)],
}
PAD, CLS, SOP, EOP, GMASK = 50000, 50002, 50006, 50007, 50009  # glm-large-chinese's special ids
DYGRAPH = "dygraph (ours)"


class FixedTokenizer:
    """What export needs of a tokenizer, for random weights without vocabulary files; the runner only checks that
    the export has a tokenizer config (the bench never decodes text)."""

    pad_token_id = eos_token_id = PAD
    cls_token_id, sop_token_id, eop_token_id, gmask_token_id = CLS, SOP, EOP, GMASK
    smask_token_id, mask_token_id = 50008, 50003

    def __len__(self):
        return 50010

    def save_pretrained(self, path: str) -> None:
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as handle:
            json.dump({"tokenizer_class": "GLMChineseTokenizer", "note": "bench: no vocabulary"}, handle)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="transformer layers (glm-large-chinese has 24)")
    parser.add_argument("--new_tokens", type=int, default=32, help="tokens generated per row")
    parser.add_argument("--grid", choices=sorted(GRIDS), default="default", help="which (prompt, batch, beams) rows")
    parser.add_argument("--backends", default="paddle,onnxruntime", help="comma-separated runner backends (fp32)")
    parser.add_argument("--quant", default="weight_only_int8,weight_only_int4",
                        help="comma-separated weight-only exports served by onnxruntime ('' for none)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of decodes per row; the fastest counts")
    parser.add_argument("--cpu_threads", type=int, default=os.cpu_count(), help="threads of the runners")
    parser.add_argument("--quality", nargs="?", const="checkpoints/demo/dureader_qg", default=None, metavar="CHECKPOINT",
                        help="also BLEU-4 and token identity of each quantization on the demo's dev set (default "
                             "checkpoint: the demo's, `python finetune_generation.py` writes it)")
    parser.add_argument("--smoke", action="store_true", help="a 1-layer hidden-64 model, 4 new tokens: seconds")
    parser.add_argument("--probe_memory", nargs=2, metavar=("EXPORT_DIR", "BACKEND"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.hidden, args.heads = (64, 4) if args.smoke else (1024, 16)
    if args.smoke:
        args.layers, args.new_tokens, args.grid, args.repeats = 1, 4, "smoke", 1
    return args


# ---------------------------------------------------------------------------------------------------- measuring

def measured_bandwidth(size: int = 8192) -> float:
    """Bytes per second a GEMV reads weights at (a size x size fp32 matrix, 256 MB by default; best of 5)."""
    matrix = np.random.default_rng(0).random((size, size), dtype=np.float32)
    vector = np.ones(size, dtype=np.float32)
    best = min(_seconds(lambda: matrix @ vector) for _ in range(5))
    return matrix.nbytes / best


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_weight_bytes(onnx_file: str) -> int:
    """Bytes of the weights a decode step reads: every initializer but the tables only looked up (Gather)."""
    import onnx

    model = onnx.load(onnx_file)
    readers: Dict[str, set] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    return sum(i.ByteSize() for i in model.graph.initializer if readers.get(i.name, set()) - {"Gather"})


class TimedStepper:
    """Wraps a `Stepper`: times its prompt pass and counts decode steps."""

    def __init__(self, stepper):
        self.stepper, self.prefill_seconds, self.steps = stepper, 0.0, 0

    def prefill(self, expand: int) -> np.ndarray:
        start = time.perf_counter()
        logits = self.stepper.prefill(expand)
        self.prefill_seconds = time.perf_counter() - start
        return logits

    def step(self, tokens: np.ndarray) -> np.ndarray:
        self.steps += 1
        return self.stepper.step(tokens)

    def reorder(self, index: np.ndarray) -> None:
        self.stepper.reorder(index)


@dataclass
class Timing:
    prefill: float  # seconds
    step: float  # seconds per decode step
    sequences: List[List[int]]


def timed_generate(make_stepper, rows: int, config, repeats: int) -> Timing:
    """The fastest of `repeats` decodes (a fresh stepper each), prompt pass and steps apart."""
    from paddle_glm.decoding import generate

    best = None
    for _ in range(repeats):
        stepper = TimedStepper(make_stepper())
        start = time.perf_counter()
        result = generate(stepper, rows, config)
        total = time.perf_counter() - start
        timing = Timing(stepper.prefill_seconds, (total - stepper.prefill_seconds) / max(stepper.steps, 1),
                        result.sequences)
        if best is None or timing.step < best.step:
            best = timing
    return best


def rss_bytes() -> Tuple[int, int]:
    """(resident, peak resident) bytes of this process."""
    fields = {}
    with open("/proc/self/status", encoding="utf-8") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def probe_memory(export_dir: str, backend: str, cpu_threads: int) -> None:
    """(In a fresh process) print what loading the runner and one greedy decode of a 128-token prompt add."""
    import onnxruntime  # noqa: F401  (imported before the baseline, like paddle, so only the runner's memory counts)
    import paddle  # noqa: F401

    from infer.runner import GLMRunner
    from paddle_glm.decoding import DecodingConfig

    base, _ = rss_bytes()
    runner = GLMRunner(export_dir, backend=backend, cpu_threads=cpu_threads)
    loaded, _ = rss_bytes()
    _, prompts = prompts_for(128, 1)
    runner.generate(prompts, DecodingConfig(eos_token_id=EOP, pad_token_id=PAD, max_length=32, min_length=32))
    after, peak = rss_bytes()
    print(json.dumps({"loaded": loaded - base, "after": after - base, "peak": peak - base}))


def memory_row(export_dir: str, backend: str, label: str, weight_bytes: int, cache_bytes: int, cpu_threads: int) -> str:
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--probe_memory", export_dir, backend,
                           "--cpu_threads", str(cpu_threads)], capture_output=True, text=True, check=True)
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    allowed = 1.2 * weight_bytes + cache_bytes
    return (f"| {label} | {weight_bytes / 1e6:.0f} | {cache_bytes / 1e6:.1f} | {measured['after'] / 1e6:.0f} | "
            f"{measured['peak'] / 1e6:.0f} | {measured['after'] / (weight_bytes + cache_bytes):.2f}x | "
            f"{'yes' if measured['after'] <= allowed else 'no'} |")


# ---------------------------------------------------------------------------------------------------- the model

def build_model(layers: int, hidden: int, heads: int):
    import paddle

    from paddle_glm.models.glm import GLMConfig, GLMForConditionalGeneration

    paddle.seed(0)
    model = GLMForConditionalGeneration(GLMConfig(
        num_layers=layers, vocab_size=50048, hidden_size=hidden, num_attention_heads=heads, max_sequence_length=1024,
        output_predict=True, parallel_output=False))
    model.eval()
    return model


def prompts_for(prompt_length: int, batch: int, seed: int = 0):
    """(sources, generation examples) of `batch` random GLM prompts of `prompt_length` tokens + <sop>."""
    rng = np.random.default_rng(seed)
    sources = [[CLS] + rng.integers(100, 40000, prompt_length - 3).tolist() + [GMASK, PAD] for _ in range(batch)]
    mask_pos = prompt_length - 2
    examples = [{"input_ids": np.array(s + [SOP]), "attention_mask": np.array(prompt_length),
                 "position_ids": np.array([list(range(prompt_length)) + [mask_pos], [0] * prompt_length + [1]]),
                 "position_step": np.array([0, 1])} for s in sources]
    return sources, examples


def export_all(model, root: str, new_tokens: int, quants: List[str]) -> Dict[Optional[str], str]:
    """The fp32 export (Paddle graph and ONNX) and one ONNX export per quantization: {quant: directory}."""
    from export.exporter import export_generation_model
    from paddle_glm.models.glm import GLMTemplate

    directories = {}
    for quant in [None] + quants:
        directory = os.path.join(root, quant or "float32")
        export_generation_model(model, GLMTemplate(FixedTokenizer()), directory, "float32", 1024 - new_tokens - 1,
                                new_tokens, onnx=True, quant=quant)
        directories[quant] = directory
    return directories


# ---------------------------------------------------------------------------------------------------- the tables

def speed_table(args, model, directories: Dict[Optional[str], str], engines: List[Tuple[str, Optional[str]]]) -> None:
    import paddle

    from infer.runner import GLMRunner
    from paddle_glm.decoding import DecodingConfig
    from paddle_glm.generation import DygraphStepper
    from paddle_glm.inputs import generation_batch

    size = 1024 if args.smoke else 8192
    bandwidths = [measured_bandwidth(size)]
    runners = {spec: GLMRunner(directories[spec[1]], backend=spec[0], cpu_threads=args.cpu_threads)
               for spec in engines}
    weights = {quant: step_weight_bytes(os.path.join(directory, "step.onnx"))
               for quant, directory in directories.items()}
    rows = []  # (prompt, batch, beams, engine, quant, Timing, same tokens)
    for prompt_length, batch, beams in GRIDS[args.grid]:
        _, prompts = prompts_for(prompt_length, batch)
        config = DecodingConfig(decode_strategy="beam_search" if beams > 1 else "greedy_search", num_beams=beams,
                                max_length=args.new_tokens, min_length=args.new_tokens, eos_token_id=EOP,
                                pad_token_id=PAD)
        makers = {(DYGRAPH, None): lambda: DygraphStepper(model, generation_batch(prompts, PAD))}
        makers.update({spec: (lambda runner=runners[spec]: runner.stepper(prompts, config)) for spec in engines})
        best: Dict[Tuple[str, Optional[str]], Timing] = {}
        # Rounds over the engines: a burst of other jobs' load then slows one round of each, not all the repeats
        # of one engine. The dygraph model (slow with beams) runs 2 rounds at most.
        for round_index in range(args.repeats):
            for spec, make in makers.items():
                if spec[0] == DYGRAPH and round_index >= 2:
                    continue
                with paddle.no_grad():
                    timing = timed_generate(make, batch, config, 1)
                if spec not in best or timing.step < best[spec].step:
                    best[spec] = timing
        bandwidths.append(measured_bandwidth(size))
        dygraph = best[(DYGRAPH, None)]
        rows.append((prompt_length, batch, beams, DYGRAPH, None, dygraph, "-"))
        fp32_sequences = None
        for backend, quant in engines:
            timing = best[(backend, quant)]
            if quant is None:
                same = "yes" if timing.sequences == dygraph.sequences else "NO"
                fp32_sequences = fp32_sequences or timing.sequences
            else:
                reference = fp32_sequences or dygraph.sequences
                same = f"{100 * np.mean([a == b for a, b in zip(timing.sequences, reference)]):.0f}% of fp32's"
            rows.append((prompt_length, batch, beams, backend, quant, timing, same))
    # Other jobs on the machine lower a single measurement: the best of one before and one after each grid row counts.
    bandwidth = max(bandwidths)
    print(f"GLM {args.layers} layers x hidden {args.hidden}, vocab 50048; {args.new_tokens} new tokens; CPU "
          f"({os.cpu_count()} cores, {args.cpu_threads} threads); GEMV bandwidth {bandwidth / 1e9:.1f} GB/s (best of "
          f"{', '.join(f'{b / 1e9:.1f}' for b in bandwidths)}); weights a step reads: "
          + ", ".join(f"{q or 'fp32'} {b / 1e6:.0f} MB (bound {b / bandwidth * 1e3:.2f} ms/step)"
                      for q, b in weights.items()))
    print("\n| prompt | batch | beams | engine | prefill ms | decode ms/step | decode tokens/s | bound ms/step | "
          "% of bound | same tokens |\n|---|---|---|---|---|---|---|---|---|---|")
    for prompt_length, batch, beams, name, quant, timing, same in rows:
        bound = weights[quant] / bandwidth
        print(f"| {prompt_length} | {batch} | {beams} | {name}{' ' + quant if quant else ''} | "
              f"{timing.prefill * 1e3:.0f} | {timing.step * 1e3:.1f} | {batch / timing.step:.1f} | "
              f"{bound * 1e3:.2f} | {100 * bound / timing.step:.0f}% | {same} |", flush=True)


def memory_table(args, directories: Dict[Optional[str], str], engines: List[Tuple[str, Optional[str]]]) -> None:
    cache = 2 * args.layers * (128 + args.new_tokens) * args.hidden * 4  # greedy, prompt 128, batch 1
    print("\nresident memory a fresh process adds for the runner + one greedy decode (prompt 128), MB\n"
          "| engine | weights | cache | resident | peak | resident / (weights + cache) | <= 1.2 x weights + cache |\n"
          "|---|---|---|---|---|---|---|")
    for backend, quant in engines[:1] if args.smoke else engines:
        directory = directories[quant]
        weights = os.path.getsize(os.path.join(directory, "step.pdiparams" if backend == "paddle" else "step.onnx"))
        print(memory_row(directory, backend, backend + (f" {quant}" if quant else ""), weights, cache,
                         args.cpu_threads))


def quality_table(checkpoint: str, quants: List[str], cpu_threads: int) -> None:
    """Greedy answers of the demo's fine-tuned model to its whole dev set, fp32 against each quantization."""
    from paddle_glm.demo import held_out_pairs
    from paddle_glm.metrics import bleu4

    if not os.path.isdir(checkpoint):
        print(f"\nno {checkpoint}: run `python finetune_generation.py` for the quality rows")
        return
    pairs = held_out_pairs(count=10 ** 6)
    print(f"\ndemo dev set ({len(pairs)} questions, greedy, onnxruntime): {checkpoint}\n"
          "| weights | BLEU-4 | outputs token-identical to fp32 |\n|---|---|---|")
    fp32 = None
    for quant in [None] + quants:
        template, sequences = dev_sequences(checkpoint, quant, pairs, cpu_threads)
        fp32 = fp32 or sequences
        predictions = [template.response(s) for s in sequences]
        references = [template.response(template.target_ids(reference)) for _, reference in pairs]
        same = np.mean([a == b for a, b in zip(sequences, fp32)])
        print(f"| {quant or 'fp32'} | {100 * bleu4(predictions, references):.2f} | {100 * same:.1f}% |", flush=True)


def dev_sequences(checkpoint: str, quant: Optional[str], pairs, cpu_threads: int):
    """(template, greedy sequences of every source in `pairs`) of `checkpoint` exported with `quant`."""
    from export.exporter import main as export
    from infer.runner import GLMRunner
    from paddle_glm.decoding import DecodingConfig

    with tempfile.TemporaryDirectory(prefix="glm-bench-quality-") as directory:
        export(["--model_name_or_path", checkpoint, "--output_path", directory, "--tgt_length", "32"]
               + (["--quant", quant] if quant else ["--onnx"]))
        runner = GLMRunner(directory, backend="onnxruntime", cpu_threads=cpu_threads)
        template = runner.template()
        config = DecodingConfig(eos_token_id=template.stop_ids, pad_token_id=template.pad_id, max_length=32,
                                tokenizer_size=template.tokenizer_size)
        sequences = []
        for start in range(0, len(pairs), 20):
            prompts = [template.generation_example(template.prompt_ids(source, (), 96)[0])
                       for source, _ in pairs[start:start + 20]]
            sequences += runner.generate(prompts, config).sequences
    return template, sequences


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    if args.probe_memory:
        probe_memory(*args.probe_memory, args.cpu_threads)
        return
    quants = [q for q in args.quant.split(",") if q]
    engines = [(b, None) for b in args.backends.split(",") if b] + [("onnxruntime", quant) for quant in quants]
    from paddle_glm.args import set_device

    set_device("cpu", all_cores=True)  # the dygraph rows run as predict_generation.py runs
    model = build_model(args.layers, args.hidden, args.heads)
    with tempfile.TemporaryDirectory(prefix="glm-bench-export-") as root:  # 0.3 GB per export at 2 layers
        directories = export_all(model, root, args.new_tokens, quants)
        speed_table(args, model, directories, engines)
        memory_table(args, directories, engines)
    if args.quality:
        quality_table(args.quality, quants, args.cpu_threads)


if __name__ == "__main__":
    main()
