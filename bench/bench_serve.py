"""Serving throughput and latency of `serve_generation.py`: continuous batching against one request at a time.

Each row runs the same workload through the HTTP API (streamed chat completions, seeded sampling (greedy decoding
of random weights repeats tokens that decode to no text, which would stream nothing), exactly --new_tokens new
tokens each: min_tokens = max_tokens, prompts of 1-4 sentences) from N concurrent clients (1, 4, 16, 64; one
asyncio loop, --requests_per_client requests each), against two servers started in this run on the same export:
continuous batching (--max_batch_size 64) and one request at a time (--max_batch_size 1: each request decoded
alone, the strategy of THUDM's demo servers). Output tokens/s and requests/s over the row's wall time; time to
first token (TTFT) and inter-token latency (ITL: between streamed chunks) p50/p99, seen by the clients, which
share the machine's cores with the server.

Models: the demo export (checkpoints/demo/export when `make demo` wrote it, else the demo's tiny GLM with random
weights) and a 2-layer GLM of glm-large-chinese's geometry (hidden 1024, 16 heads, vocab 50048, random weights,
the real sentencepiece vocabulary from ../shared/assets when present).

    python bench/bench_serve.py                 # both models, 1/4/16/64 clients
    python bench/bench_serve.py --models large --clients 1,16
    python bench/bench_serve.py --smoke         # the tiny model, 1 and 4 clients, seconds
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_EXPORT = os.path.join(ROOT, "checkpoints", "demo", "export")
COG_MODEL = os.path.join(ROOT, "..", "shared", "assets", "cog-pretrain.model")
SENTENCES = ["北京是中国的首都，也是全国的政治和文化中心。", "长江是中国最长的河流，全长六千三百公里。",
             "天气很好，我们去公园散步吧。", "答案：三，上下文：一二三四五六七八九十。"]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="demo,large", help="demo and/or large (comma-separated)")
    parser.add_argument("--clients", default="1,4,16,64", help="concurrent clients per row (comma-separated)")
    parser.add_argument("--requests_per_client", type=int, default=2, help="requests each client sends in turn")
    parser.add_argument("--new_tokens", type=int, default=24, help="tokens generated per request")
    parser.add_argument("--backend", choices=("paddle", "onnxruntime"), default="onnxruntime",
                        help="the engine of both servers (onnxruntime batches rows best on CPU: bench_infer.py)")
    parser.add_argument("--batch_wait_ms", type=float, default=None,
                        help="the continuous-batching server's --batch_wait_ms (default: the server's default)")
    parser.add_argument("--smoke", action="store_true", help="the tiny model, 1 and 4 clients, 4 tokens: seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.clients, args.requests_per_client, args.new_tokens = "demo", "1,4", 1, 4
    return args


# ---------------------------------------------------------------------------------------------------- the exports

def demo_export(root: str, new_tokens: int, backend: str) -> Tuple[str, str]:
    """(directory, label): the demo's export if it is current, else the demo's tiny GLM (random weights)."""
    from export.exporter import EXPORT_FORMAT_VERSION

    config = os.path.join(DEMO_EXPORT, "export_config.json")
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as handle:
            exported = json.load(handle)
        current = exported.get("format_version") == EXPORT_FORMAT_VERSION and exported["tgt_length"] >= new_tokens
        if current and (backend == "paddle" or os.path.isfile(os.path.join(DEMO_EXPORT, "step.onnx"))):
            return DEMO_EXPORT, "demo export"
    from export.exporter import main as export
    from paddle_glm.demo import build_demo_model
    from paddle_glm.demo_data import write_demo_splits

    splits = write_demo_splits(os.path.join(root, "data"), "qg", train=48, dev=4, seed=1)
    build_demo_model(os.path.join(root, "base"), splits["train"], seed=0)
    directory = os.path.join(root, "demo")
    export(["--model_name_or_path", os.path.join(root, "base"), "--output_path", directory,
            "--tgt_length", str(max(new_tokens, 12))] + (["--onnx"] if backend != "paddle" else []))
    return directory, "demo-shaped GLM (random weights)"


def large_export(root: str, new_tokens: int, backend: str) -> Tuple[str, str]:
    """A 2-layer glm-large-chinese-shaped GLM with random weights (bench_infer's), exported with a GLM tokenizer."""
    from bench_infer import build_model

    from export.exporter import export_generation_model
    from paddle_glm.models.glm import GLMTemplate, tokenizer_from_sentencepiece

    if not os.path.isfile(COG_MODEL):
        raise SystemExit(f"--models large needs the GLM sentencepiece model at {COG_MODEL} (../shared/assets)")
    directory = os.path.join(root, "large")
    template = GLMTemplate(tokenizer_from_sentencepiece(COG_MODEL))
    export_generation_model(build_model(2, 1024, 16), template, directory, "float32", 256, max(new_tokens, 32),
                            onnx=backend != "paddle")
    return directory, "glm-large shape, 2 layers"


# ---------------------------------------------------------------------------------------------------- the clients

def start_server(export_dir: str, backend: str, max_batch_size: int, log_path: str,
                 batch_wait_ms: Optional[float] = None) -> Tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(log_path, "w", encoding="utf-8")
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve_generation.py"), "--model_path",
                                export_dir, "--backend", backend, "--port", str(port), "--max_batch_size",
                                str(max_batch_size),
                                "--max_queue", "1024", "--request_timeout", "3600"]
                               + ([] if batch_wait_ms is None else ["--batch_wait_ms", str(batch_wait_ms)]),
                               cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    log.close()
    with open(log_path, encoding="utf-8") as handle:
        raise SystemExit("the server did not start; the end of its log:\n" + handle.read()[-3000:])


async def one_request(client, url: str, index: int, new_tokens: int) -> Dict[str, object]:
    text = "".join(SENTENCES[(index + k) % len(SENTENCES)] for k in range(1 + index % 4))
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": new_tokens, "min_tokens": new_tokens,
            "seed": index, "stream": True}
    start, arrivals, tokens = time.perf_counter(), [], 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                arrivals.append(time.perf_counter())
            tokens = chunk.get("usage", {}).get("completion_tokens", tokens)
    return {"ttft": arrivals[0] - start, "itl": np.diff(arrivals).tolist(), "tokens": tokens}


async def run_level(url: str, clients: int, requests: int, new_tokens: int) -> Dict[str, float]:
    import httpx

    pending = list(range(requests))
    results = []

    async def client_loop(client):
        while pending:
            results.append(await one_request(client, url, pending.pop(), new_tokens))

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - start
    ttft = np.array([r["ttft"] for r in results])
    itl = np.array([gap for r in results for gap in r["itl"]] or [0.0])
    return {"tokens_per_s": sum(r["tokens"] for r in results) / wall, "requests_per_s": len(results) / wall,
            "ttft_p50": np.percentile(ttft, 50), "ttft_p99": np.percentile(ttft, 99),
            "itl_p50": np.percentile(itl, 50), "itl_p99": np.percentile(itl, 99)}


def bench_model(export_dir: str, label: str, args, root: str) -> Dict[Tuple[str, int], Dict[str, float]]:
    levels = [int(c) for c in args.clients.split(",")]
    rows = {}
    for mode, batch, wait in (("one at a time", 1, None), ("continuous batching", max(levels), args.batch_wait_ms)):
        shown = mode + (f", --batch_wait_ms {wait:g}" if wait is not None else "")
        process, url = start_server(export_dir, args.backend, batch, os.path.join(root, f"server-{batch}.log"), wait)
        try:
            asyncio.run(run_level(url, 1, 1, args.new_tokens))  # warm-up
            for clients in levels:
                row = asyncio.run(run_level(url, clients, clients * args.requests_per_client, args.new_tokens))
                rows[(mode, clients)] = row
                print(f"| {label} | {shown} | {clients} | {row['tokens_per_s']:.1f} | {row['requests_per_s']:.2f} | "
                      f"{row['ttft_p50'] * 1e3:.0f} | {row['ttft_p99'] * 1e3:.0f} | {row['itl_p50'] * 1e3:.1f} | "
                      f"{row['itl_p99'] * 1e3:.1f} |", flush=True)
        finally:
            process.terminate()
            process.wait(60)
    return rows


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    with tempfile.TemporaryDirectory(prefix="glm-bench-serve-") as root:  # 0.6 GB of exports and the servers' logs
        run(args, root)


def run(args: argparse.Namespace, root: str) -> None:
    builders = {"demo": demo_export, "large": large_export}
    exports = [builders[name](root, args.new_tokens, args.backend) for name in args.models.split(",") if name]
    print(f"\n{args.new_tokens} new tokens per request (sampled, streamed), {args.requests_per_client} request(s) per "
          f"client; --backend {args.backend}; CPU ({os.cpu_count()} cores, shared by server and clients)\n"
          "| model | serving | clients | tokens/s | requests/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | "
          "ITL p99 ms |\n|---|---|---|---|---|---|---|---|---|")
    summary = []
    for export_dir, label in exports:
        rows = bench_model(export_dir, label, args, root)
        levels = sorted({clients for _, clients in rows})
        for clients in levels:
            gain = rows[("continuous batching", clients)]["tokens_per_s"] / rows[("one at a time", clients)][
                "tokens_per_s"]
            summary.append(f"{label}, {clients} clients: continuous batching gives {gain:.1f}x the tokens/s of one "
                           "at a time")
        if 1 in levels and 4 in levels:
            ratio = rows[("continuous batching", 4)]["ttft_p99"] / rows[("continuous batching", 1)]["ttft_p99"]
            summary.append(f"{label}: p99 TTFT at 4 clients = {ratio:.2f}x its 1-client value (goal < 2x)")
    print("\n" + "\n".join(summary))


if __name__ == "__main__":
    main()
