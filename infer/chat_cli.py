"""Chat in a terminal with a model behind the OpenAI HTTP API of `serve_generation.py`.

    python chat_generation.py                               # serves the demo export in this process, then chats
    python chat_generation.py --model_path EXPORT_DIR --temperature 0.8 --top_p 0.9
    python chat_generation.py --url http://127.0.0.1:8000 --api_key KEY

Each turn sends the whole history (`POST /v1/chat/completions`, `"stream": true`): the server renders it with the
model's chat template, and the answer is printed token by token as the SSE chunks arrive. As in THUDM's
`cli_demo.py`: `clear` resets the history (and the screen), `exit` or `stop` quits, Ctrl-C interrupts the current
answer and keeps the session (the part already printed stays in the history, as THUDM's `stream_chat` keeps it).
Without `--url` the server is started in this process (`infer.server.serve_in_background`) with the model flags,
so both modes speak the same API and the CLI never touches the engine itself.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import logging
import signal
import sys
from typing import Callable, Dict, Iterator, List, Optional, TextIO, Tuple

import httpx

from paddle_glm.args import check, exit_on_bad_input
from paddle_glm.logs import verbose_requested

__all__ = ["ChatError", "ChatClient", "chat", "main"]

WELCOME = ("Chat with {model}: type a message; `clear` resets the history, `exit` or `stop` quits, Ctrl-C "
           "interrupts an answer.")
# serve_generation.py's flags that the CLI sets itself: the in-process server listens on 127.0.0.1 and a free port,
# with the CLI's --api_key and --verbose.
OWN_SERVER_FLAGS = ("host", "port", "api_key", "verbose")
DECODING_FLAGS = {  # flag -> (type, help); None = the server's default
    "max_tokens": (int, "Most new tokens per answer."),
    "temperature": (float, "Sampling temperature (0 = greedy)."),
    "top_p": (float, "Nucleus sampling: keep the smallest token set with this probability mass."),
    "top_k": (int, "Sample among the k most likely tokens (0 = all)."),
    "seed": (int, "Seed of the sampler, for reproducible answers."),
}
CLEAR_SCREEN = "\033[H\033[2J\033[3J"


class ChatError(RuntimeError):
    """The server could not be reached or answered an error; the message says which and what to do."""


class ChatClient:
    """A streaming client of one server's `/v1/chat/completions`: history in, answer pieces out."""

    def __init__(self, url: str, api_key: Optional[str] = None, model: Optional[str] = None,
                 decoding: Optional[Dict[str, float]] = None):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # No read timeout: the first token may wait in the server's queue, which ends it with its own
        # --request_timeout; Ctrl-C interrupts a wait the user does not want.
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(10.0, read=None))
        self.decoding = decoding or {}
        self.model = model or self._first_model()

    def _first_model(self) -> str:
        """The first model the server lists: checks at start that it is reachable and accepts the key."""
        with self._request("GET", "/v1/models") as response:
            models = [entry["id"] for entry in json.loads(response.read()).get("data", [])]
        if not models:
            raise ChatError(f"{self.url}/v1/models lists no model")
        return models[0]

    @contextlib.contextmanager
    def _request(self, method: str, path: str, body: Optional[dict] = None) -> Iterator[httpx.Response]:
        try:
            with self.http.stream(method, path, json=body) as response:
                if response.status_code != 200:
                    raise ChatError(f"the server answered {response.status_code}: {_error_message(response)}")
                yield response
        except httpx.TransportError as error:
            raise ChatError(f"cannot reach {self.url} ({error or type(error).__name__}): is the server running? "
                            "Start one with `python serve_generation.py`, or leave out --url") from None

    def stream(self, messages: List[Dict[str, str]]) -> Iterator[str]:
        """The answer to `messages` in the pieces the server streams (SSE `data:` chunks up to `data: [DONE]`)."""
        body = {"model": self.model, "messages": messages, "stream": True, **self.decoding}
        with self._request("POST", "/v1/chat/completions", body) as response:
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, SSE comments
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    return
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise ChatError(f"the server sent an unreadable chunk: {data[:100]!r}") from None
                if "error" in chunk:  # e.g. the request timed out in the server's queue
                    raise ChatError(chunk["error"].get("message", str(chunk["error"])))
                for choice in chunk.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        yield piece

    def close(self) -> None:
        self.http.close()


def _error_message(response: httpx.Response) -> str:
    """The server's `{"error": {"message": ...}}`, or the body's start when it is not in that shape."""
    body = response.read()
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace")[:200] or response.reason_phrase


def chat(client: ChatClient, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> None:
    """The read-answer loop until `exit`, `stop` or end of input; Ctrl-C at the prompt only starts a new line."""
    welcome = WELCOME.format(model=client.model)
    out.write(welcome + "\n")
    history: List[Dict[str, str]] = []
    while True:
        try:
            query = read("\nUser: ").strip()
        except EOFError:
            out.write("\n")
            return
        except KeyboardInterrupt:
            out.write("^C (type exit to quit)\n")
            continue
        if query in ("exit", "stop"):
            return
        if query == "clear":
            history = []
            if out.isatty():
                out.write(CLEAR_SCREEN)
            out.write(welcome + "\n")
            continue
        if query:
            history = history + _answer(client, history + [{"role": "user", "content": query}], out)


def _answer(client: ChatClient, messages: List[Dict[str, str]], out: TextIO) -> List[Dict[str, str]]:
    """Print the streamed answer to `messages`; return the turn to add to the history: the question and what was
    printed of the answer (interrupted answers included), or nothing when no answer came."""
    out.write("\nAssistant: ")
    out.flush()
    answer = ""
    try:
        with contextlib.closing(client.stream(messages)) as pieces:  # closing drops the connection: the server
            for piece in pieces:                                     # frees the request's slot
                answer += piece
                out.write(piece)
                out.flush()
        out.write("\n")
    except KeyboardInterrupt:
        out.write(" [interrupted]\n")
    except ChatError as error:
        out.write("\n")
        print(f"error: {error}", file=sys.stderr, flush=True)
        return []
    out.flush()
    return [messages[-1], {"role": "assistant", "content": answer}] if answer else []


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chat_generation.py", description=__doc__.split("\n\n")[0],
        epilog="In the chat: `clear` resets the history, `exit` or `stop` quits, Ctrl-C interrupts an answer.")
    server = parser.add_argument_group("server")
    server.add_argument("--url", help="Base URL of a running serve_generation.py (e.g. http://127.0.0.1:8000); "
                                      "without it the model flags below start one in this process.")
    server.add_argument("--api_key", help="Sent as `Authorization: Bearer KEY` (with --url); without --url the "
                                          "in-process server requires it too.")
    server.add_argument("--model", help="Model name sent with each request (default: the first the server lists).")
    model = parser.add_argument_group("in-process server (without --url): serve_generation.py's flags")
    for name, (text, default) in server_flags().items():
        shown = "" if default is None or "default" in text else f" (default: {default})"
        model.add_argument(f"--{name}", metavar=name.upper(), help=text + shown)
    decoding = parser.add_argument_group("decoding (default: the server's)")
    for name, (kind, text) in DECODING_FLAGS.items():
        decoding.add_argument(f"--{name}", type=kind, help=text)
    parser.add_argument("--verbose", action="store_true", help="Show every log line of the in-process server.")
    return parser


def server_flags() -> Dict[str, Tuple[str, object]]:
    """serve_generation.py's flags the CLI forwards: name -> (help, default). Read from the server's own
    arguments, so that --help lists them as the server takes them; their values are checked by the server."""
    from infer.server import ServeArguments

    return {f.name: (f.metadata.get("help", ""), f.default) for f in dataclasses.fields(ServeArguments)
            if f.name not in OWN_SERVER_FLAGS}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The flags, with every bad value named in one error."""
    args = build_parser().parse_args(argv)
    problems = [f"--{name} serves a model in this process: it has no effect with --url"
                for name in server_flags() if args.url and getattr(args, name) is not None]
    if args.url and not args.url.startswith(("http://", "https://")):
        problems.append(f"--url {args.url}: give a base URL such as http://127.0.0.1:8000")
    ranges = {"max_tokens": (lambda v: v >= 1, ">= 1"), "temperature": (lambda v: v >= 0, ">= 0"),
              "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"), "top_k": (lambda v: v >= 0, ">= 0")}
    problems += [f"--{name} {getattr(args, name)}: must be {text}" for name, (ok, text) in ranges.items()
                 if getattr(args, name) is not None and not ok(getattr(args, name))]
    check(problems)
    return args


def server_argv(args: argparse.Namespace) -> List[str]:
    """serve_generation.py's flags for the in-process server: the model flags given, the key, --verbose."""
    argv = [part for name in server_flags() if getattr(args, name) is not None
            for part in (f"--{name}", getattr(args, name))]
    if args.api_key:
        argv += ["--api_key", args.api_key]
    return argv + (["--verbose"] if args.verbose else [])


@contextlib.contextmanager
def served(args: argparse.Namespace) -> Iterator[str]:
    """The base URL of the server to talk to: --url, or one started in this process for the session."""
    if args.url:
        yield args.url
        return
    from infer.server import serve_in_background

    url, stop = serve_in_background(server_argv(args))  # quiet unless --verbose: no request lines amid the chat
    try:
        yield url
    finally:
        stop()


@exit_on_bad_input
def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    if not verbose_requested(argv):  # httpx logs each request at INFO once PaddleNLP has set up the root logger
        logging.getLogger("httpx").setLevel(logging.WARNING)
    with contextlib.suppress(ImportError):  # line editing and recall at the prompt, where the platform has it
        importlib.import_module("readline")
    decoding = {name: getattr(args, name) for name in DECODING_FLAGS if getattr(args, name) is not None}
    # Ctrl-C interrupts an answer even when the CLI was started with SIGINT ignored (a background job of a shell
    # without job control passes that on: `make test` run that way never saw its Ctrl-C).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with served(args) as url:
            client = ChatClient(url, args.api_key, args.model, decoding)
            try:
                chat(client)
            finally:
                client.close()
    except ChatError as error:  # at start: unreachable server, wrong key
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None

