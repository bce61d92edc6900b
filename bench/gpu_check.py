"""The GPU check's measurements, one check per process (`bench/gpu_check.sh` runs them and prints the table).

    python bench/gpu_check.py --check attention --results rows.jsonl   # appends its rows (JSON lines)
    python bench/gpu_check.py --report rows.jsonl                      # the table of every row, one per line
    python bench/gpu_check.py --check serve_large --dry_run ...        # CPU, tiny shapes, float32: seconds

Checks (random weights, glm-large-chinese geometry: hidden 1024, 16 heads, vocab 50048):
- `attention` (1): logits of the fused path (`use_flash_attention`, Paddle's scaled_dot_product_attention) against
  the plain one, bf16, 6 layers, batch 4 x 608 tokens (part A 480): both against an fp32 plain reference; the fused
  path is within bf16 tolerance when its error is at most twice the plain bf16 path's (+1e-3).
- `amp` (2): AMP O2 bf16 (fp32 master weights) against fp32 training, 6 layers, AdamW, 50 steps on one repeated
  batch of 8 x 256 tokens (the loss falls from ~10.8): every step's loss within 2% of fp32's.
- `mfu` (2): a bf16 O2 fine-tuning step (best of 3 after one) of the 24-layer shape, 608 + 160 tokens, batch 8,
  recompute, loss on the 160 target positions: model FLOPs (`paddle_glm.flops`) / step time against the card's
  dense bf16 peak (data sheet) and a measured 8192^3 bf16 matmul.
- `serve_large`, `serve_10b` (3, 4): bf16 export of glm-large (24 layers) or a glm-10b-shaped model (hidden 4096, 64
  heads, `--layers_10b` of its 48 layers), Paddle Inference on the GPU: decode ms/step (prefill apart, prompt 128,
  32 new tokens, greedy, batch 1 and 16) against the HBM bound (the bytes a step reads / the data sheet's bandwidth,
  or a measured device copy's for a card not in CARDS), and runner tokens = dynamic-graph tokens; then the same
  model exported weight_only_int8 (`export.quantize`: the dynamic graph becomes the int8 one too, so its tokens are
  the int8 reference).
With --dry_run everything runs on CPU in float32 with a 2-layer hidden-64 model (int8 served by ONNX Runtime's
MatMulNBits: Paddle's weight_only_linear has no CPU kernel), so that parsing and reporting are tested
(tests/test_bench.py); its verdicts mean nothing.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from typing import List, Optional

import numpy as np

CHECKS = ("attention", "amp", "mfu", "serve_large", "serve_10b")
# Dense bf16 TFLOP/s and HBM TB/s by device name (vendor data sheets; the first match counts).
CARDS = [("H200", 989, 4.8), ("H100 PCIe", 756, 2.0), ("H100", 989, 3.35), ("A100-SXM4-80GB", 312, 2.04),
         ("A100 80GB PCIe", 312, 1.94), ("A100", 312, 1.56), ("L40S", 362, 0.864), ("L4", 121, 0.3),
         ("A10", 125, 0.6), ("RTX 4090", 165, 1.01)]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", choices=CHECKS, help="the check to run (appends its rows to --results)")
    parser.add_argument("--results", help="JSON-lines file the rows are appended to")
    parser.add_argument("--report", metavar="RESULTS", help="print the table of a results file")
    parser.add_argument("--layers_10b", type=int, default=12, help="layers of the glm-10b-shaped model (it has 48)")
    parser.add_argument("--dry_run", action="store_true",
                        help="CPU, float32, tiny shapes: seconds (tests the parsing and the report)")
    args = parser.parse_args(argv)
    if not args.report and not (args.check and args.results):
        parser.error("give --check and --results, or --report")
    return args


# ---------------------------------------------------------------------------------------------------- rows

def row(check: str, setting: str, measured: str, goal: str, ok: Optional[bool]) -> dict:
    """One line of the table; `ok` None: reported, no goal to meet."""
    return {"check": check, "setting": setting, "measured": measured, "goal": goal, "ok": ok}


def report(path: str) -> str:
    """The table of every row in `path`; lines that are no JSON object (a crashed check's half line) are counted."""
    rows, unreadable = [], 0
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                value = None
            if isinstance(value, dict):
                rows.append(value)
            elif line.strip():
                unreadable += 1
    lines = ["| check | setting | measured | goal | verdict |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['check']} | - | {r['error']} | - | ERROR |")
            continue
        verdict = {True: "ok", False: "MISSED", None: "-"}[r["ok"]]
        lines.append(f"| {r['check']} | {r['setting']} | {r['measured']} | {r['goal']} | {verdict} |")
    goals = [r for r in rows if r.get("ok") is not None]
    errors = sum("error" in r for r in rows)
    lines.append(f"\n{sum(r['ok'] for r in goals)} of {len(goals)} goals met, {errors} check(s) failed"
                 + (f", {unreadable} unreadable line(s)" if unreadable else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- measuring

class Setup:
    """Device, dtype and shapes of a run (the GPU's, or --dry_run's tiny CPU ones)."""

    def __init__(self, dry_run: bool, layers_10b: int):
        import paddle

        self.dry_run = dry_run
        self.device = "cpu" if dry_run else "gpu"
        paddle.set_device(self.device)
        self.dtype = "float32" if dry_run else "bfloat16"
        self.name = "CPU (dry run)" if dry_run else paddle.device.cuda.get_device_name()
        self.large = (2, 64, 4) if dry_run else (24, 1024, 16)  # (layers, hidden, heads)
        self.six = (2, 64, 4) if dry_run else (6, 1024, 16)
        self.ten_b = (2, 128, 8) if dry_run else (layers_10b, 4096, 64)
        self.steps = 5 if dry_run else 50

    def card(self):
        """(bf16 FLOP/s, HBM bytes/s) of the data sheet, or (None, None) for a card not in CARDS."""
        for name, tflops, tbs in CARDS:
            if name in self.name:
                return tflops * 1e12, tbs * 1e12
        return None, None


def sync_seconds(fn, repeats: int = 3) -> float:
    """Best wall time of `fn` (which must end by reading a value back, so the device has finished)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak(dtype: str, size: int) -> float:
    import paddle

    a, b = paddle.randn([size, size]).astype(dtype), paddle.randn([size, size]).astype(dtype)
    return 2.0 * size ** 3 / sync_seconds(lambda: float(paddle.matmul(a, b)[0, 0].astype("float32")), 5)


def copy_bandwidth(size: int) -> float:
    """Bytes/s a device copy moves (read + write) of a `size`-byte tensor."""
    import paddle

    x = paddle.ones([size // 4], dtype="float32")
    return 2 * size / sync_seconds(lambda: float(x.clone()[-1]), 5)


def glm(layers: int, hidden: int, heads: int, **overrides):
    import paddle

    from paddle_glm.models.glm import GLMConfig, GLMForConditionalGeneration

    paddle.seed(0)
    config = dict(num_layers=layers, vocab_size=50048, hidden_size=hidden, num_attention_heads=heads,
                  max_sequence_length=1024, output_predict=True, parallel_output=False, embedding_dropout_prob=0.0,
                  attention_dropout_prob=0.0, output_dropout_prob=0.0)
    return GLMForConditionalGeneration(GLMConfig(**dict(config, **overrides)))


def training_batch(batch: int, source: int, target: int, seed: int = 0):
    """GLM training tensors: random ids, part A (`source`) bidirectional, loss on the `target` last positions."""
    import paddle

    rng = np.random.default_rng(seed)
    ids = rng.integers(100, 40000, [batch, source + target])
    loss_mask = np.zeros([batch, source + target], "float32")
    loss_mask[:, source:] = 1
    return dict(input_ids=paddle.to_tensor(ids), attention_mask=paddle.full([batch], source, dtype="int64"),
                labels=paddle.to_tensor(np.roll(ids, -1, axis=1)), loss_mask=paddle.to_tensor(loss_mask))


# ---------------------------------------------------------------------------------------------------- the checks

def check_attention(setup: Setup) -> List[dict]:
    import paddle

    model = glm(*setup.six)
    model.eval()
    batch = training_batch(1 if setup.dry_run else 4, 24 if setup.dry_run else 480, 8 if setup.dry_run else 128)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    def logits(fused: bool):
        for layer in model.sublayers():
            if hasattr(layer, "use_flash_attention"):
                layer.use_flash_attention = fused
        with paddle.no_grad():
            return model(**inputs).logits.astype("float32")

    reference = logits(False).numpy()  # fp32, plain
    model.to(dtype=setup.dtype)
    errors, times = {}, {}
    for fused in (False, True):
        errors[fused] = float(np.abs(logits(fused).numpy() - reference).max() / np.abs(reference).max())
        times[fused] = sync_seconds(lambda: float(logits(fused)[0, 0, 0]))
    ok = errors[True] <= 2 * errors[False] + 1e-3
    setting = f"{setup.six[0]} layers, {setup.dtype}, tokens {list(inputs['input_ids'].shape)}"
    return [row("(1) fused attention vs plain", setting,
                f"max logit error vs fp32 (/ max logit): fused {errors[True]:.2e}, plain {errors[False]:.2e}; "
                f"forward {times[True] * 1e3:.1f} vs {times[False] * 1e3:.1f} ms",
                "fused error <= 2 x plain's + 1e-3", ok)]


def check_amp(setup: Setup) -> List[dict]:
    import paddle

    batch = training_batch(2 if setup.dry_run else 8, 16 if setup.dry_run else 192, 16 if setup.dry_run else 64)
    curves = {}
    initial = glm(*setup.six).state_dict()
    for precision in ("float32", setup.dtype):
        model = glm(*setup.six)
        model.set_state_dict(initial)
        model.train()
        optimizer = paddle.optimizer.AdamW(1e-4, parameters=model.parameters())
        half = precision != "float32"
        if half:
            model, optimizer = paddle.amp.decorate(model, optimizer, level="O2", dtype=precision, master_weight=True)
        losses = []
        for _ in range(setup.steps):
            with paddle.amp.auto_cast(enable=half, level="O2", dtype=precision if half else "bfloat16"):
                loss = model(**batch, loss_positions_only=True).loss
            loss.backward()
            optimizer.step()
            optimizer.clear_grad()
            losses.append(float(loss))
        curves[precision] = np.array(losses)
    fp32, half = curves["float32"], curves[setup.dtype]
    worst = float(np.max(np.abs(half - fp32) / fp32))
    return [row("(2) AMP O2 vs fp32 training", f"{setup.six[0]} layers, {setup.steps} steps, {setup.dtype}",
                f"loss {fp32[0]:.3f} -> fp32 {fp32[-1]:.3f}, {setup.dtype} {half[-1]:.3f}; "
                f"worst step {100 * worst:.2f}%",
                "every step within 2%", worst <= 0.02)]


def check_mfu(setup: Setup) -> List[dict]:
    import paddle

    from paddle_glm.flops import linear_weights, step_flops

    layers, hidden, heads = setup.large
    size, source, target = (2, 48, 16) if setup.dry_run else (8, 608, 160)
    model = glm(layers, hidden, heads)
    model.recompute_enable()  # what the Trainer does for --recompute
    model.train()
    optimizer = paddle.optimizer.AdamW(1e-5, parameters=model.parameters())
    if setup.dtype != "float32":
        model, optimizer = paddle.amp.decorate(model, optimizer, level="O2", dtype=setup.dtype, master_weight=True)
    batch = training_batch(size, source, target)

    def step():
        half = setup.dtype != "float32"
        with paddle.amp.auto_cast(enable=half, level="O2", dtype=setup.dtype if half else "bfloat16"):
            loss = model(**batch, loss_positions_only=True).loss
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        return float(loss)

    step()
    seconds = sync_seconds(step, 3)
    flops = step_flops(linear_weights(model, 50048), hidden, layers, 50048, [source + target] * size, size * target)
    spec, _ = setup.card()
    measured = matmul_peak(setup.dtype, 1024 if setup.dry_run else 8192)
    achieved = flops / seconds
    against = f"{100 * achieved / spec:.1f}% of the {spec / 1e12:.0f} TFLOP/s data sheet, " if spec else ""
    return [row("(2) MFU, fine-tuning step", f"{layers} layers, {source}+{target} x {size}, recompute, {setup.dtype}",
                f"{seconds * 1e3:.0f} ms/step, {achieved / 1e12:.1f} TFLOP/s: {against}"
                f"{100 * achieved / measured:.1f}% of a measured {measured / 1e12:.0f} TFLOP/s matmul", "report", None)]


def step_bytes(model) -> int:
    """Bytes of the parameters a decode step reads: all but the position tables, which are looked up."""
    return sum(int(np.prod(p.shape)) * p.element_size() for name, p in model.named_parameters()
               if "position_embeddings" not in name)


def check_serve(setup: Setup, shape, label: str) -> List[dict]:
    new_tokens, prompt = (4, 16) if setup.dry_run else (32, 128)
    measured = copy_bandwidth(2 ** 24 if setup.dry_run else 2 ** 31)
    bandwidth = setup.card()[1] or measured  # the data sheet's HBM bandwidth where the card is known
    model = glm(*shape)
    model.eval()
    rows = []
    for quant in (None, "weight_only_int8"):  # the int8 export quantizes `model`: after the bf16 rows
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as directory:  # 20 GB at glm-10b's 48 layers
            rows += serve_rows(setup, model, quant, directory, f"{label} {quant or setup.dtype}",
                               f"{shape[0]} layers x {shape[1]}", (bandwidth, measured), prompt, new_tokens)
    return rows


def serve_rows(setup: Setup, model, quant: Optional[str], directory: str, label: str, shape: str, bandwidths,
               prompt: int, new_tokens: int) -> List[dict]:
    """Export `model` (cast and, with `quant`, quantized in place) and time runner and dynamic graph;
    `bandwidths`: (the bound's bytes/s, a measured copy's)."""
    import paddle

    from bench_infer import EOP, PAD, FixedTokenizer, prompts_for, timed_generate
    from export.exporter import export_generation_model
    from infer.runner import GLMRunner
    from paddle_glm.decoding import DecodingConfig
    from paddle_glm.generation import DygraphStepper
    from paddle_glm.inputs import generation_batch
    from paddle_glm.models.glm import GLMTemplate

    export_generation_model(model, GLMTemplate(FixedTokenizer()), directory, setup.dtype, 1024 - new_tokens - 1,
                            new_tokens, quant=quant)
    backend = "onnxruntime" if quant and setup.dry_run else "paddle"  # no CPU weight_only_linear kernel
    engine = "ONNX Runtime" if backend == "onnxruntime" else "Paddle Inference"
    runner = GLMRunner(directory, backend=backend, device=setup.device)
    weights = step_bytes(model)
    bound = weights / bandwidths[0]
    rows = []
    for batch in (1, 16):
        _, prompts = prompts_for(prompt, batch)
        config = DecodingConfig(max_length=new_tokens, min_length=new_tokens, eos_token_id=EOP, pad_token_id=PAD)
        with paddle.no_grad():
            dygraph = timed_generate(lambda: DygraphStepper(model, generation_batch(prompts, PAD)), batch, config, 1)
        served = timed_generate(lambda: runner.stepper(prompts, config), batch, config, 2)
        same = np.mean([a == b for a, b in zip(served.sequences, dygraph.sequences)])
        rows.append(row(f"({4 if quant else 3}) {engine}, {label}",
                        f"{shape}, batch {batch}, prompt {prompt}, {new_tokens} new",
                        f"{served.step * 1e3:.2f} ms/step ({batch / served.step:.0f} tokens/s), bound "
                        f"{bound * 1e3:.2f} ms ({weights / 1e9:.2f} GB / {bandwidths[0] / 1e9:.0f} GB/s; a copy "
                        f"measured {bandwidths[1] / 1e9:.0f}): "
                        f"{100 * bound / served.step:.0f}%; prefill {served.prefill * 1e3:.0f} ms; dygraph "
                        f"{dygraph.step * 1e3:.1f} ms/step; tokens = dygraph: {100 * same:.0f}%",
                        "runner tokens = dygraph tokens", bool(same == 1.0)))
    return rows


def run_check(name: str, setup: Setup) -> List[dict]:
    if name == "attention":
        return check_attention(setup)
    if name == "amp":
        return check_amp(setup)
    if name == "mfu":
        return check_mfu(setup)
    if name == "serve_large":
        return check_serve(setup, setup.large, "glm-large")
    return check_serve(setup, setup.ten_b, f"glm-10b-shaped ({setup.ten_b[0]} of 48 layers)")


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    if args.report:
        print(report(args.report))
        return
    rows = run_check(args.check, Setup(args.dry_run, args.layers_10b))
    with open(args.results, "a", encoding="utf-8") as handle:  # one write: a check killed mid-way leaves no row
        handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


if __name__ == "__main__":
    main()
