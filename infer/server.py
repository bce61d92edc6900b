"""The OpenAI-compatible HTTP server (`serve_generation.py`): FastAPI endpoints over one `infer.scheduler.Scheduler`.

    python serve_generation.py --model_path EXPORT_DIR [--backend onnxruntime] [--port 8000] [--api_key KEY]

Endpoints: POST /v1/completions, POST /v1/chat/completions (streamed as server-sent events with `"stream": true`),
GET /v1/models, /health, /metrics (Prometheus), / (the chat page, `infer/static/chat.html`). Requests are checked
in `infer.protocol` (errors in OpenAI's shape, with their HTTP status); valid ones become scheduler jobs whose
tokens come back through a `JobListener`. SIGTERM drains: new requests get 503, running ones finish, then the
process exits 0.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from paddle_glm.args import VERBOSE_HELP, check, exit_on_bad_input
from paddle_glm.logs import configure as configure_logs, logger

from .engines import BACKENDS
from .metrics import ServerMetrics
from .protocol import (APIError, ChatRequest, CompletionRequest, Limits, chat_prompt, completion_prompts,
                       cut_at_stop, decoding_config, held_back, parse_body)
from .scheduler import ExportedBatch, Job, QueueFull, Scheduler, wait_until

__all__ = ["ServeArguments", "Service", "create_app", "main", "serve_in_background"]

CHAT_PAGE = os.path.join(os.path.dirname(__file__), "static", "chat.html")


@dataclass
class ServeArguments:
    model_path: str = field(default="checkpoints/demo/export",
                            metadata={"help": "Export directory (export_generation_model.py) to serve."})
    model_prefix: Optional[str] = field(default=None, metadata={"help": "The export is --model_path/--model_prefix "
                                                                        "(the reference's pair)."})
    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Serve a checkpoint in dynamic graph instead of an export (slower)."})
    tgt_length: int = field(default=64, metadata={"help": "With --model_name_or_path: the most new tokens a request "
                                                          "may ask for (an export has its own)."})
    src_length: Optional[int] = field(default=None, metadata={"help": "With --model_name_or_path: the longest prompt "
                                                                      "(default: the model's positions - tgt_length)."})
    backend: str = field(default="paddle", metadata={"help": "paddle (Paddle Inference), onnxruntime or fastdeploy."})
    device: Optional[str] = field(default=None, metadata={"help": "cpu or gpu (default: gpu when one is visible)."})
    cpu_threads: Optional[int] = field(default=None, metadata={"help": "CPU math threads of the engine."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on (0.0.0.0: every interface)."})
    port: int = field(default=8000, metadata={"help": "Port to listen on."})
    max_batch_size: int = field(default=16, metadata={"help": "Most sequences decoded together (a request with n "
                                                                "samples takes n)."})
    max_queue: int = field(default=64, metadata={"help": "Most requests waiting to join the batch; more get 429."})
    max_prefill_tokens: int = field(default=512, metadata={"help": "Prompt tokens prefilled between two decode steps "
                                                                   "(at least one prompt): bounds how long running "
                                                                   "requests wait for new ones to join."})
    batch_wait_ms: float = field(default=1.0, metadata={"help": "A request arriving at an idle server waits until "
                                                                "no other arrived for this long (at most 10 times as "
                                                                "long), so that requests sent together share one "
                                                                "prompt pass. 0: none."})
    request_timeout: float = field(default=300.0, metadata={"help": "Seconds a request may take, queue included; "
                                                                    "then 504 (or an error event when streaming)."})
    api_key: Optional[str] = field(default=None, metadata={"help": "Require `Authorization: Bearer KEY` on /v1/."})
    served_model_name: Optional[str] = field(default=None, metadata={"help": "The model id clients name (default: "
                                                                             "the export directory's name)."})
    chat_history: bool = field(default=True, metadata={"help": "Render earlier chat messages as the template's "
                                                               "history; false: the last user message alone is the "
                                                               "source (GLM's question-generation models)."})
    max_body_bytes: int = field(default=1 << 20, metadata={"help": "Largest request body; larger ones get 413."})
    verbose: bool = field(default=False, metadata={"help": VERBOSE_HELP + " Also logs every HTTP request."})


class JobListener:
    """One job's tokens -> text deltas (stop strings held back and cut) and timings, in the scheduler's thread;
    events go to the request's asyncio queue."""

    def __init__(self, service: "Service", stops: List[str], emit: Callable[[tuple], None], index: int,
                 arrived: float, stream: bool):
        self.service, self.stops, self.emit, self.index, self.stream = service, stops, emit, index, stream
        self.arrived, self.last = arrived, None
        self.sent: List[str] = []

    def tokens(self, job: Job, live: np.ndarray) -> List[int]:
        metrics, now = self.service.metrics, time.monotonic()
        if self.last is None:
            metrics.time_to_first_token.observe(now - self.arrived)
            self.sent = [""] * job.rows
        else:
            metrics.time_per_token.observe(now - self.last)
        self.last = now
        metrics.generated_tokens.inc(int(live.sum()))
        if not self.stream and not self.stops:
            return []  # the text matters only at the end
        stopped = []
        eos = job.config.eos_ids
        for row in np.flatnonzero(live).tolist():
            ids = job.generated[row].tolist()
            ended = ids[-1] in eos
            text = self.service.template.response(ids[:-1] if ended else ids)
            cut = cut_at_stop(text, self.stops)
            if cut is not None:
                stopped.append(row)
                text = text[:cut]
            elif not ended:
                text = text[:len(text) - held_back(text, self.stops)]
            if self.stream and len(text) > len(self.sent[row]) and text.startswith(self.sent[row]):
                self.emit(("delta", self.index + row, text[len(self.sent[row]):]))
                self.sent[row] = text
        return stopped

    def done(self, job: Job, error: Optional[BaseException]) -> None:
        self.emit(("done", job, error))

    def final_text(self, job: Job, row: int) -> Tuple[str, str]:
        """(the row's answer, cut before a stop string; its finish reason)."""
        text = self.service.template.response(job.sequences[row])
        cut = cut_at_stop(text, self.stops)
        return (text, job.reasons[row]) if cut is None else (text[:cut], "stop")


class EventOutbox:
    """Events from the scheduler's thread to requests' asyncio queues on one event loop, handed on in one wake-up of
    the loop each time the scheduler `flush`es (after each prompt pass's first tokens and after each step): waking
    the loop for each event (`call_soon_threadsafe`: a pipe write, then the loop's thread takes the GIL from the
    scheduler's) cost ~0.5 ms an event, 16 a step at 16 streams."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.lock = loop, threading.Lock()
        self.items: List[Tuple[asyncio.Queue, tuple]] = []
        self.waking = False  # a wake-up is asked for and has not run yet

    def sender(self, events: asyncio.Queue) -> Callable[[tuple], None]:
        """The `emit` of a request's listeners: its events to `events`, at the next `flush`."""
        return lambda event: self.put(events, event)

    def put(self, events: asyncio.Queue, event: tuple) -> None:
        with self.lock:
            self.items.append((events, event))

    def flush(self) -> None:
        with self.lock:
            if not self.items or self.waking:
                return
            self.waking = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: the server stopped, nobody waits
            pass

    def _deliver(self) -> None:
        with self.lock:
            items, self.items, self.waking = self.items, [], False
        for events, event in items:
            events.put_nowait(event)


class Service:
    """The model behind the endpoints: template, limits, scheduler, metrics, draining state."""

    def __init__(self, args: ServeArguments):
        self.args = args
        runner, name = load_runner(args)
        self.template = runner.template()
        config = runner.config
        self.limits = Limits(config["src_length"], config["tgt_length"], args.max_batch_size)
        self.outboxes: Dict[asyncio.AbstractEventLoop, EventOutbox] = {}
        self.scheduler = Scheduler(ExportedBatch(runner), args.max_batch_size, args.max_queue,
                                   args.max_prefill_tokens, self.flush_events, args.batch_wait_ms / 1000).start()
        self.model_id = args.served_model_name or name
        self.created = int(time.time())
        self.draining = False
        self.inflight = 0  # accepted requests whose response is not finished
        self.metrics = ServerMetrics(lambda: self.scheduler.pending, lambda: self.scheduler.running_rows)

    def outbox(self, loop: asyncio.AbstractEventLoop) -> EventOutbox:
        """The outbox of requests served on `loop` (uvicorn runs one loop)."""
        if loop not in self.outboxes:
            self.outboxes[loop] = EventOutbox(loop)
        return self.outboxes[loop]

    def flush_events(self) -> None:
        for outbox in list(self.outboxes.values()):
            outbox.flush()

    def close(self) -> None:
        self.scheduler.stop()


def load_runner(args: ServeArguments):
    """(the runner, the model's default id): an export through its engine, or a checkpoint in dynamic graph."""
    from paddle_glm.args import default_device

    from .runner import GLMRunner, export_directory, read_export_config

    device = args.device or default_device()
    if args.model_name_or_path:
        from .dygraph import DygraphRunner

        return (DygraphRunner(args.model_name_or_path, device, args.tgt_length, args.src_length),
                _name(args.model_name_or_path))
    export_dir = export_directory(args.model_path, args.model_prefix)
    if not os.path.isdir(export_dir):
        raise FileNotFoundError(f"--model_path {export_dir}: no such export directory (export_generation_model.py "
                                "writes one)")
    config = read_export_config(export_dir)
    check([f"{export_dir} was exported in {config['dtype']}, which serves on GPU (--device gpu)"]
          if device == "cpu" and config["dtype"] != "float32" else [])
    return GLMRunner(export_dir, args.backend, device, args.cpu_threads), _name(export_dir)


def _name(path: str) -> str:
    return os.path.basename(os.path.normpath(path))


# ---------------------------------------------------------------- the app


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="paddle-glm", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = service.metrics

    def error_response(error: APIError, endpoint: str) -> JSONResponse:
        metrics.requests.labels(endpoint, str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {error.detail}"
        return error_response(APIError(error.status_code, message, kind=kind), "other")  # any path: one label

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):
        logger.exception(f"{request.method} {request.url.path} failed")
        return error_response(APIError(500, f"internal error: {error}", kind="server_error"), request.url.path)

    def authorize(request: Request) -> None:
        key = service.args.api_key
        if key and request.headers.get("authorization", "") != f"Bearer {key}":
            raise APIError(401, "invalid or missing API key: send `Authorization: Bearer KEY`",
                           kind="authentication_error", code="invalid_api_key")

    @app.get("/health")
    async def health():
        if service.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/")
    async def page():
        if not os.path.isfile(CHAT_PAGE):
            return error_response(APIError(404, "no chat page: infer/static/chat.html is missing",
                                           kind="not_found_error"), "/")
        with open(CHAT_PAGE, encoding="utf-8") as handle:
            return HTMLResponse(handle.read())

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            authorize(request)
        except APIError as error:
            return error_response(error, "/v1/models")
        return {"object": "list", "data": [{"id": service.model_id, "object": "model", "created": service.created,
                                            "owned_by": "paddle-glm"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    async def generate(request: Request, chat: bool):
        endpoint = request.url.path
        arrived = time.monotonic()
        try:
            authorize(request)
            if service.draining:
                raise APIError(503, "the server is shutting down: retry on another instance", kind="server_error",
                               code="draining")
            body = parse_body(await read_body(request, service.args.max_body_bytes),
                              ChatRequest if chat else CompletionRequest)
            if body.model is not None and body.model != service.model_id:
                raise APIError(404, f"model {body.model!r} does not exist: this server serves {service.model_id!r}",
                               param="model", kind="not_found_error", code="model_not_found")
            config = decoding_config(body, service.template, service.limits)
            if chat:
                prompts = [chat_prompt(body, service.template, service.limits, service.args.chat_history)]
            else:
                prompts = completion_prompts(body, service.template, service.limits)
            events: asyncio.Queue = asyncio.Queue()
            jobs = submit(prompts, config, body, service.outbox(asyncio.get_running_loop()).sender(events), arrived)
        except APIError as error:
            return error_response(error, endpoint)
        service.inflight += 1
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        reply = Reply(request_id, service.model_id, chat, jobs, config.num_return_sequences,
                      [len(job.example["input_ids"]) for job in jobs])
        deadline = arrived + service.args.request_timeout
        if body.stream:
            return StreamingResponse(stream(reply, events, deadline, endpoint), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            status = await collect(reply, events, deadline, request)
            if status == 200:
                metrics.requests.labels(endpoint, "200").inc()
                return reply.response()
            if status == 499:
                metrics.requests.labels(endpoint, "499").inc()
                return Response(status_code=499)
            return error_response(reply.error(status), endpoint)
        finally:
            cancel(jobs)
            service.inflight -= 1

    def submit(prompts: List[List[int]], config, body, emit, arrived: float) -> List[Job]:
        jobs: List[Job] = []
        index = 0
        try:
            for prompt in prompts:
                listener = JobListener(service, body.stops, emit, index, arrived, body.stream)
                job = Job(service.template.generation_example(prompt), config, listener)
                service.scheduler.submit(job)
                jobs.append(job)
                index += config.num_return_sequences
        except QueueFull as error:
            cancel(jobs)
            raise APIError(429, f"the server is busy: {error}; retry later", kind="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        return jobs

    async def collect(reply: "Reply", events: asyncio.Queue, deadline: float, request: Request) -> int:
        """Wait for every job: 200, 504 (timeout), 500 (the model failed) or 499 (the client went away)."""
        while reply.open:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return 504
            try:
                event = await asyncio.wait_for(events.get(), timeout=min(0.05, remaining))
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return 499
                continue
            reply.take(event)
        return 500 if reply.failure else 200

    async def stream(reply: "Reply", events: asyncio.Queue, deadline: float, endpoint: str):
        status = "499"  # unless it ends otherwise: the client went away
        try:
            if reply.chat:
                for index in range(reply.choices):
                    yield sse(reply.chunk(index, role=True))
            while reply.open:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    status = "504"
                    yield sse(reply.error(504).body())
                    break
                try:
                    event = await asyncio.wait_for(events.get(), timeout=remaining)
                except asyncio.TimeoutError:
                    continue
                for chunk in reply.take(event):
                    yield sse(chunk)
            else:
                if reply.failure:
                    status = "500"
                    yield sse(reply.error(500).body())
                else:
                    status = "200"
                    yield sse(reply.usage_chunk())
            yield "data: [DONE]\n\n"
        finally:
            cancel(reply.jobs)
            service.inflight -= 1
            metrics.requests.labels(endpoint, status).inc()

    return app


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def cancel(jobs: List[Job]) -> None:
    for job in jobs:
        job.cancel()


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past `limit` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the body is {declared} bytes, over the server's limit of {limit} "
                            "(--max_body_bytes)", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the body is over the server's limit of {limit} bytes (--max_body_bytes)",
                           code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


class Reply:
    """The response being assembled from a request's jobs (choice i*n + j: prompt i's sample j)."""

    def __init__(self, request_id: str, model: str, chat: bool, jobs: List[Job], per_prompt: int,
                 prompt_tokens: List[int]):
        self.id, self.model, self.chat, self.jobs, self.per_prompt = request_id, model, chat, jobs, per_prompt
        self.created = int(time.time())
        self.prompt_tokens = sum(prompt_tokens)
        self.choices = len(jobs) * per_prompt
        self.texts: List[Optional[str]] = [None] * self.choices
        self.reasons: List[Optional[str]] = [None] * self.choices
        self.completion_tokens = 0
        self.pending = set(range(len(jobs)))
        self.failure: Optional[BaseException] = None

    @property
    def open(self) -> bool:
        return bool(self.pending) and self.failure is None

    def take(self, event: tuple) -> List[dict]:
        """Apply a scheduler event; the stream chunks it makes."""
        if event[0] == "delta":
            _, index, text = event
            return [self.chunk(index, text=text)]
        _, job, error = event
        number = self.jobs.index(job)
        self.pending.discard(number)
        if error is not None:
            self.failure = error
            return []
        chunks = []
        listener: JobListener = job.listener
        for row, sequence in enumerate(job.sequences):
            index = number * self.per_prompt + row
            text, reason = listener.final_text(job, row)
            sent = listener.sent[row] if row < len(listener.sent) else ""
            self.texts[index], self.reasons[index] = text, reason
            self.completion_tokens += len(sequence)
            rest = text[len(sent):] if text.startswith(sent) else ""
            chunks.append(self.chunk(index, text=rest, reason=reason))
        return chunks

    def chunk(self, index: int, text: str = "", reason: Optional[str] = None, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [choice]}

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def usage_chunk(self) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [],
                "usage": self.usage()}

    def response(self) -> dict:
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                        "finish_reason": reason} for i, (text, reason) in enumerate(zip(self.texts, self.reasons))]
            kind = "chat.completion"
        else:
            choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                       for i, (text, reason) in enumerate(zip(self.texts, self.reasons))]
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                "usage": self.usage()}

    def error(self, status: int) -> APIError:
        if status == 504:
            return APIError(504, "the request took longer than the server's --request_timeout", kind="timeout_error",
                            code="timeout")
        return APIError(500, f"generation failed: {self.failure}", kind="server_error")


# ---------------------------------------------------------------- running it


def parse_arguments(argv: Optional[List[str]]) -> ServeArguments:
    from paddlenlp.trainer import PdArgumentParser

    (args,) = PdArgumentParser(ServeArguments).parse_args_into_dataclasses(args=sys.argv[1:] if argv is None else argv)
    problems = [f"--{name} {getattr(args, name)}: must be at least 1"
                for name in ("max_batch_size", "max_queue", "max_body_bytes", "max_prefill_tokens", "tgt_length")
                if getattr(args, name) < 1]
    if args.backend not in BACKENDS:
        problems.append(f"--backend {args.backend}: choose one of {', '.join(BACKENDS)}")
    if not 0 <= args.batch_wait_ms <= 1000:
        problems.append(f"--batch_wait_ms {args.batch_wait_ms}: must lie in [0, 1000]")
    if not 0 <= args.port < 65536:
        problems.append(f"--port {args.port}: must lie in [0, 65535]")
    if not args.request_timeout > 0:
        problems.append(f"--request_timeout {args.request_timeout}: must be > 0 seconds")
    if args.api_key is not None and not args.api_key:
        problems.append("--api_key: give a non-empty key")
    check(problems)
    return args


def _server(service: Service, host: str, port: int, verbose: bool):
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """SIGTERM/SIGINT: answer new requests 503 until the running ones are done, then exit; a second signal
        exits at once."""

        def handle_exit(self, sig: int, frame) -> None:
            if service.draining:
                self.should_exit = self.force_exit = True
                return
            service.draining = True
            logger.info(f"signal {signal.Signals(sig).name}: draining {service.inflight} running request(s)")
            threading.Thread(target=self._exit_when_drained, daemon=True).start()

        def _exit_when_drained(self) -> None:
            wait_until(lambda: service.inflight == 0, timeout=service.args.request_timeout + 5)
            self.should_exit = True

    config = uvicorn.Config(create_app(service), host=host, port=port, log_level="info" if verbose else "warning",
                            access_log=verbose, timeout_graceful_shutdown=5)
    return DrainingServer(config)


@exit_on_bad_input
def main(argv: Optional[List[str]] = None) -> None:
    configure_logs(argv)
    args = parse_arguments(argv)
    service = Service(args)
    server = _server(service, args.host, args.port, args.verbose)
    logger.info(f"serving {service.model_id} on http://{args.host}:{args.port} (OpenAI API under /v1)")
    try:
        server.run()
    finally:
        service.close()
    if not server.started:
        raise SystemExit(f"could not listen on {args.host}:{args.port} (in use?)")


def serve_in_background(argv: List[str]) -> Tuple[str, Callable[[], None]]:
    """The server of `serve_generation.py argv...` on 127.0.0.1 and a free port, in a thread of this process:
    (its base URL once /health answers, a function that stops it)."""
    configure_logs(argv)
    args = parse_arguments(argv)
    service = Service(args)
    server = _server(service, "127.0.0.1", 0, args.verbose)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), name="server", daemon=True)
    thread.start()

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as answer:
                return answer.status == 200
        except OSError:
            return False

    if not wait_until(lambda: healthy() or not thread.is_alive(), timeout=60) or not thread.is_alive():
        service.close()
        raise RuntimeError(f"the background server did not start on {url}")

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=30)
        service.close()
        sock.close()

    return url, stop


if __name__ == "__main__":
    main()
