"""The server as a process (`serve_generation.py`): a bounded load test (issue 16) and SIGTERM draining.

Load: 200 requests from 32 concurrent clients, mixing valid ones (greedy and streamed seeded sampling, checked
against the offline runner), invalid ones (checked for their 4xx and message), over-long prompts and clients that
hang up mid-stream; then no traceback in the server's log and its RSS back within 10% of its warm level."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil

from infer.runner import GLMRunner
from infer.scheduler import wait_until
from paddle_glm.decoding import DecodingConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["答案：北京，上下文：北京是中国的首都，也是文化中心。", "hello world", "答案：三，上下文：一二三四五六七八九十",
         "天气很好，我们去公园散步吧", "abc def ghi jkl", "答案：长江，上下文：长江是中国最长的河流"]


def start_server(flags, log_path):
    """`serve_generation.py flags` on a free port: (process, base URL) once /health answers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(log_path, "w", encoding="utf-8")
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve_generation.py"), *flags, "--port",
                                str(port)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def healthy():
        try:
            return httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return process.poll() is not None

    assert wait_until(healthy, timeout=120) and process.poll() is None, open(log_path).read()
    return process, url


def metric(url: str, name: str) -> float:
    lines = [line for line in httpx.get(url + "/metrics").text.splitlines() if line.startswith(name + " ")]
    return float(lines[0].split()[-1])


class Workload:
    """Request i of the mix, what it must get back, and the client that sends it."""

    def __init__(self, url, runner):
        self.url, self.runner, self.template = url, runner, runner.template()
        self.src_length = runner.config["src_length"]
        self.references = {}

    def reference(self, text, **fields):
        key = (text, tuple(sorted(fields.items())))
        if key not in self.references:
            config = DecodingConfig(eos_token_id=self.template.stop_ids, pad_token_id=self.template.pad_id,
                                    tokenizer_size=self.template.tokenizer_size, **fields)
            prompt = self.template.generation_example(self.template.prompt_ids(text, (), self.src_length)[0])
            self.references[key] = [self.template.response(s) for s in self.runner.generate([prompt], config).sequences]
        return self.references[key]

    def expected(self, i):
        text = TEXTS[i % len(TEXTS)]
        kind = i % 10
        if kind < 4:
            return self.reference(text, max_length=3 + i % 10)
        if kind < 6:
            return self.reference(text, max_length=12, decode_strategy="sampling", seed=i % 7, top_k=20)
        return None

    def send(self, i):
        """Send request i; returns a problem (str) or None."""
        text, kind = TEXTS[i % len(TEXTS)], i % 10
        post = f"{self.url}/v1/completions"
        if kind < 4:
            answer = httpx.post(post, json={"prompt": text, "max_tokens": 3 + i % 10, "temperature": 0}, timeout=120)
            got = [answer.json()["choices"][0]["text"]] if answer.status_code == 200 else answer.text
        elif kind < 6:
            body = {"messages": [{"role": "user", "content": text}], "max_tokens": 12, "seed": i % 7, "top_k": 20,
                    "stream": True}
            with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body, timeout=120) as response:
                lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
            if lines[-1] != "[DONE]" or "usage" not in json.loads(lines[-2]):
                return f"{i}: stream did not end with usage and [DONE]"
            got = ["".join(c["choices"][0]["delta"].get("content", "") for c in map(json.loads, lines[:-2])
                           if c["choices"])]
        elif kind == 6:
            field, value = [("temperature", -1), ("top_p", 2), ("n", 0), ("max_tokens", 99)][i % 4]
            answer = httpx.post(post, json={"prompt": text, field: value}, timeout=120)
            error = answer.json()["error"]
            ok = answer.status_code == 400 and error["param"] == field and field in error["message"]
            return None if ok else f"{i}: {field}={value} gave {answer.status_code} {error}"
        elif kind == 7:
            answer = httpx.post(post, json={"prompt": "长" * (self.src_length + 5)}, timeout=120)
            ok = answer.status_code == 400 and f"src_length of {self.src_length}" in answer.json()["error"]["message"]
            return None if ok else f"{i}: over-long prompt gave {answer.status_code} {answer.text}"
        elif kind == 8:
            with httpx.stream("POST", post, json={"prompt": text, "max_tokens": 12, "stream": True}, timeout=120) as r:
                next(r.iter_lines())  # then hang up
            return None
        else:
            answer = httpx.post(post, content=b'{"prompt": ', timeout=120)
            return None if answer.status_code == 422 else f"{i}: malformed JSON gave {answer.status_code}"
        expected = self.expected(i)
        return None if got == expected else f"{i}: got {got!r}, expected {expected!r}"


def test_load_mix_of_200_requests_from_32_clients(exported, tmp_path):
    runner = GLMRunner(exported["dir"])
    log = str(tmp_path / "server.log")
    process, url = start_server(["--model_path", exported["dir"], "--max_batch_size", "16", "--max_queue", "256"], log)
    try:
        work = Workload(url, runner)
        for i in list(range(200)) + list(range(1000, 1032)):
            work.expected(i)  # references first, in this thread: one runner is not to be used by several threads
        with ThreadPoolExecutor(32) as pool:
            assert [p for p in pool.map(work.send, range(1000, 1032)) if p] == []  # warm-up
            assert wait_until(lambda: metric(url, "paddle_glm_batch_rows") == 0, timeout=30)
            warm = psutil.Process(process.pid).memory_info().rss
            started = time.monotonic()
            problems = [p for p in pool.map(work.send, range(200)) if p]
            elapsed = time.monotonic() - started
        assert problems == []
        assert wait_until(lambda: metric(url, "paddle_glm_batch_rows") == 0, timeout=30)
        after = psutil.Process(process.pid).memory_info().rss
        assert after <= 1.10 * warm, f"RSS {after / 2**20:.0f} MiB after the load, {warm / 2**20:.0f} MiB warm"
        assert elapsed < 60
    finally:
        process.terminate()
        process.wait(30)
    text = open(log, encoding="utf-8").read()
    assert "Traceback" not in text and "ERROR" not in text, text[-3000:]


def test_sigterm_drains_running_requests_then_exits_0(demo_base, tmp_path):
    """Three requests of 80 tokens, one at a time (dynamic graph); SIGTERM while they run: a new request gets 503
    and /health says draining, the three finish with all their tokens, then the process exits 0."""
    log = str(tmp_path / "server.log")
    process, url = start_server(["--model_name_or_path", demo_base["model"], "--tgt_length", "80",
                                 "--max_batch_size", "1"], log)
    request = {"prompt": TEXTS[0], "max_tokens": 80, "min_tokens": 80, "temperature": 0}
    try:
        with ThreadPoolExecutor(3) as pool:
            running = [pool.submit(httpx.post, url + "/v1/completions", json=request, timeout=120) for _ in range(3)]
            assert wait_until(lambda: metric(url, "paddle_glm_queue_depth") >= 1, timeout=30)
            process.send_signal(signal.SIGTERM)
            assert wait_until(lambda: httpx.get(url + "/health").status_code == 503, timeout=10)
            refused = httpx.post(url + "/v1/completions", json=request, timeout=30)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
            answers = [future.result() for future in running]
        assert [a.status_code for a in answers] == [200] * 3
        assert [a.json()["usage"]["completion_tokens"] for a in answers] == [80] * 3
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    text = open(log, encoding="utf-8").read()
    assert "Traceback" not in text, text[-3000:]
