"""The chat clients' test helpers: a recording stand-in for serve_generation.py's chat API, the real server when
`infer.server` provides it, and the offline runner's answer as the reference for what the real server streams.

The stub keeps every chat request it receives (body and Authorization header) and streams scripted answers, so a
test asserts what a client sends (the history, the decoding settings, the key) independently of the model.

Answers: "echo N: TEXT" (N counts the chat requests) in pieces of 3 characters, 30 ms apart; a message starting
with "long" gets 400 pieces of "la " (12 s, to be interrupted); "fail" gets a 400 error in the server's shape.
"""
from __future__ import annotations

import asyncio
import functools
import json
import os
import threading
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse


PAGE = os.path.join(os.path.dirname(__file__), "..", "infer", "static", "chat.html")
MODEL = "stub-glm"
FAIL_MESSAGE = "max_tokens 9999 exceeds the export's tgt_length 12"
LONG_PIECE, LONG_PIECES = "la ", 400


@dataclass
class Recorded:
    requests: List[dict] = field(default_factory=list)   # chat request bodies, in order
    keys: List[Optional[str]] = field(default_factory=list)  # their Authorization headers
    ended: List[str] = field(default_factory=list)       # per streamed answer: "complete" or "cancelled"


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}}, status)


def _chunk(piece: Optional[str], finish: Optional[str] = None) -> str:
    delta = {"content": piece} if piece is not None else {}
    body = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(body)}\n\n"


def create_app(recorded: Recorded, api_key: Optional[str] = None) -> FastAPI:
    app = FastAPI()

    def refused(request: Request) -> Optional[JSONResponse]:
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            return _error(401, "invalid API key", "authentication_error")
        return None

    @app.get("/")
    def page():
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/v1/models")
    def models(request: Request):
        return refused(request) or {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        recorded.requests.append(body)
        recorded.keys.append(request.headers.get("authorization"))
        if refused(request):
            return refused(request)
        text = body["messages"][-1]["content"]
        if text.startswith("fail"):
            return _error(400, FAIL_MESSAGE, "invalid_request_error")
        if text.startswith("long"):
            pieces = [LONG_PIECE] * LONG_PIECES
        else:
            answer = f"echo {len(recorded.requests)}: {text}"
            pieces = [answer[i:i + 3] for i in range(0, len(answer), 3)]

        async def stream():
            ended = "cancelled"
            try:
                yield _chunk("")  # the role chunk OpenAI's servers send first, without content
                for piece in pieces:
                    await asyncio.sleep(0.03)
                    yield _chunk(piece)
                yield _chunk(None, "stop")
                yield "data: [DONE]\n\n"
                ended = "complete"
            finally:
                recorded.ended.append(ended)

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


class StubServer:
    """The stub on 127.0.0.1 (a free port) in a background thread: `with StubServer() as stub: stub.url ...`."""

    def __init__(self, api_key: Optional[str] = None):
        self.recorded = Recorded()
        config = uvicorn.Config(create_app(self.recorded, api_key), host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "StubServer":
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the stub server did not start")
            threading.Event().wait(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@functools.lru_cache(maxsize=1)
def _runner(export_dir: str):
    from infer.runner import GLMRunner

    return GLMRunner(export_dir)


def offline_answer(export_dir: str, text: str, max_tokens: int, history: Sequence[Tuple[str, str]] = ()) -> str:
    """What the offline runner answers `text` after the (question, answer) rounds of `history` greedily within
    `max_tokens` new tokens, the prompt rendered by the export's template: the reference for what the real
    server streams."""
    from paddle_glm.decoding import DecodingConfig

    runner = _runner(export_dir)
    template = runner.template()
    decoding = DecodingConfig(eos_token_id=template.stop_ids, pad_token_id=template.pad_id,
                              tokenizer_size=template.tokenizer_size, max_length=max_tokens)
    prompt = template.generation_example(template.prompt_ids(text, list(history), runner.config["src_length"])[0])
    return template.response(runner.generate([prompt], decoding).sequences[0])
