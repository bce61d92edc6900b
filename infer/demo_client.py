"""The end of `make demo`: start the server on the demo export, ask it one chat question with the official `openai`
client, print the answer, stop the server (SIGTERM: it drains and exits 0).

    python -m infer.demo_client [--model_path checkpoints/demo/export]
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION = "答案：北京，上下文：北京是中华人民共和国的首都，是全国的政治中心、文化中心。"


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default=os.path.join(ROOT, "checkpoints", "demo", "export"))
    args = parser.parse_args(argv)
    import openai

    for name in ("httpx", "httpx2"):  # the client logs every request at INFO
        logging.getLogger(name).setLevel(logging.WARNING)

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve_generation.py"), "--model_path",
                               args.model_path, "--port", str(port)], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, server)
        question = _question()
        client = openai.OpenAI(base_url=url + "/v1", api_key="not-needed")
        model = client.models.list().data[0].id
        answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                temperature=0)
        print(f"\nPOST {url}/v1/chat/completions (the openai client)\n  question: {question}\n"
              f"  answer:   {answer.choices[0].message.content}\n  usage:    {answer.usage.prompt_tokens} prompt "
              f"+ {answer.usage.completion_tokens} generated tokens")
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(60)
    if code != 0:
        raise SystemExit(f"the server exited with {code}")
    print("server stopped (SIGTERM: drained, exit 0)")


def _question() -> str:
    """A held-out question of the demo's dev set when the demo has run, else a fixed one."""
    from paddle_glm.demo import held_out_pairs

    pairs = held_out_pairs(1)
    return pairs[0][0] if pairs else QUESTION


def _wait_healthy(url: str, server: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode} before answering")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"the server did not answer on {url} within {timeout:.0f} s")


if __name__ == "__main__":
    main()
