"""OpenAI's request and response shapes for the server (`infer.server`), and the checks that turn a request into
prompts and `paddle_glm.decoding.DecodingConfig`s, naming the field at fault.

Sampling follows OpenAI: `temperature` defaults to 1 (sampling); `temperature: 0` is greedy search; `num_beams > 1`
is beam search (our extra, with `length_penalty` and `no_repeat_ngram_size`). `max_tokens` counts new tokens and
defaults to the export's `tgt_length`, the most it serves.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from paddle_glm.decoding import DecodingConfig

__all__ = ["APIError", "CompletionRequest", "ChatRequest", "Limits", "parse_body", "decoding_config",
           "completion_prompts", "chat_prompt", "error_body", "cut_at_stop", "held_back"]


class APIError(Exception):
    """An error answered in OpenAI's shape with its HTTP status."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error", headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields we do not use (user, stream_options, ...)

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    n: int = 1
    stop: Union[str, List[str], None] = None
    seed: Optional[int] = None
    stream: bool = False
    repetition_penalty: Optional[float] = None
    min_tokens: Optional[int] = None
    num_beams: Optional[int] = None
    length_penalty: Optional[float] = None
    no_repeat_ngram_size: Optional[int] = None

    @property
    def stops(self) -> List[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    prompt: Union[str, List[str]]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: Union[str, List[dict], None] = None

    def text(self) -> str:
        """The content; a list of parts keeps its text parts."""
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatRequest(_Sampling):
    messages: List[Message]


@dataclass
class Limits:
    """What the served export allows."""

    src_length: int  # longest prompt in tokens
    tgt_length: int  # most new tokens
    max_batch_size: int  # rows of one request (n) must fit the batch


def parse_body(raw: bytes, model: type) -> _Sampling:
    """The request of `model`'s shape: 422 for a body that is no JSON object (or not UTF-8), 400 naming the field
    whose value has the wrong type."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise APIError(422, f"the body is not UTF-8: {error}", code="invalid_body") from None
    except json.JSONDecodeError as error:
        raise APIError(422, f"the body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(422, "the body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        param = str(first["loc"][0]) if first["loc"] else None
        raise APIError(400, f"{param}: {first['msg']}", param=param, code="invalid_value") from None


def decoding_config(request: _Sampling, template, limits: Limits) -> DecodingConfig:
    """The request's decoding, or a 400 naming the first bad field and what it accepts."""
    max_tokens = limits.tgt_length if request.max_tokens is None else request.max_tokens
    beams = 1 if request.num_beams is None else request.num_beams
    temperature = 1.0 if request.temperature is None else request.temperature
    stops = request.stops
    checks = [
        ("max_tokens", max_tokens < 1, f"max_tokens={max_tokens}: generate at least 1 token"),
        ("max_tokens", max_tokens > limits.tgt_length,
         f"max_tokens={max_tokens} exceeds this export's limit of {limits.tgt_length} new tokens (its tgt_length)"),
        ("n", request.n < 1, f"n={request.n}: must be at least 1"),
        ("n", request.n > limits.max_batch_size,
         f"n={request.n} exceeds the server's --max_batch_size {limits.max_batch_size}"),
        ("num_beams", beams < 1, f"num_beams={beams}: must be at least 1"),
        ("n", beams > 1 and request.n > beams, f"n={request.n}: beam search returns at most num_beams={beams}"),
        ("n", beams == 1 and temperature == 0 and request.n > 1,
         f"n={request.n}: greedy search (temperature 0) gives one answer; sample (temperature > 0) for more"),
        ("stream", beams > 1 and request.stream,
         f"stream with num_beams={beams}: beam search cannot stream (its best answer is known only at the end); "
         "drop stream or use num_beams 1"),
        ("temperature", temperature < 0, f"temperature={temperature}: must be >= 0 (0 = greedy)"),
        ("top_p", request.top_p is not None and not 0 < request.top_p <= 1,
         f"top_p={request.top_p}: must lie in (0, 1]"),
        ("top_k", request.top_k is not None and request.top_k < 0, f"top_k={request.top_k}: must be >= 0 (0 = off)"),
        ("repetition_penalty", request.repetition_penalty is not None and not request.repetition_penalty > 0,
         f"repetition_penalty={request.repetition_penalty}: must be > 0 (1 = off)"),
        ("min_tokens", request.min_tokens is not None and not 0 <= request.min_tokens <= max_tokens,
         f"min_tokens={request.min_tokens}: must lie in [0, max_tokens={max_tokens}]"),
        ("no_repeat_ngram_size", request.no_repeat_ngram_size is not None and request.no_repeat_ngram_size < 0,
         f"no_repeat_ngram_size={request.no_repeat_ngram_size}: must be >= 0 (0 = off)"),
        ("stop", len(stops) > 4, f"stop: {len(stops)} strings, at most 4"),
        ("stop", any(not stop for stop in stops), "stop: strings must not be empty"),
    ]
    for param, bad, message in checks:
        if bad:
            raise APIError(400, message, param=param, code="invalid_value")
    strategy = "beam_search" if beams > 1 else "greedy_search" if temperature == 0 else "sampling"
    config = DecodingConfig(
        eos_token_id=template.stop_ids, pad_token_id=template.pad_id, tokenizer_size=template.tokenizer_size,
        decode_strategy=strategy, max_length=max_tokens, min_length=request.min_tokens or 0, num_beams=beams,
        length_penalty=1.0 if request.length_penalty is None else request.length_penalty,
        no_repeat_ngram_size=request.no_repeat_ngram_size or 0,
        repetition_penalty=1.0 if request.repetition_penalty is None else request.repetition_penalty,
        top_k=request.top_k or 0, top_p=1.0 if request.top_p is None else request.top_p,
        temperature=temperature if strategy == "sampling" else 1.0, num_return_sequences=request.n,
        seed=request.seed)
    try:
        config.validate()
    except ValueError as error:  # a combination the checks above do not name
        raise APIError(400, str(error), code="invalid_value") from None
    return config


def _prompt(template, query: str, history: List[Tuple[str, str]], limits: Limits, param: str) -> List[int]:
    """The prompt ids; a query whose prompt alone exceeds src_length is refused (old history rounds are dropped)."""
    alone = len(template.render(query, []))
    if alone > limits.src_length:
        raise APIError(400, f"{param}: the prompt is {alone} tokens, longer than this export's src_length of "
                            f"{limits.src_length} tokens; shorten it", param=param, code="context_length_exceeded")
    return template.prompt_ids(query, history, limits.src_length)[0]


def completion_prompts(request: CompletionRequest, template, limits: Limits) -> List[List[int]]:
    """One prompt per string: the text rendered as the family renders a query without history."""
    prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
    if not prompts:
        raise APIError(400, "prompt: give at least one string", param="prompt", code="invalid_value")
    return [_prompt(template, text, [], limits, "prompt") for text in prompts]


def chat_prompt(request: ChatRequest, template, limits: Limits, history: bool = True) -> List[int]:
    """The last user message as the query; earlier user/assistant pairs as its history (`history`), rendered with
    the family's template. System messages are not part of any family's template and are ignored."""
    messages = [m for m in request.messages if m.role != "system"]
    roles = {m.role for m in messages} - {"user", "assistant"}
    if roles:
        raise APIError(400, f"messages: unknown role {sorted(roles)[0]!r}; use system, user or assistant",
                       param="messages", code="invalid_value")
    if not messages or messages[-1].role != "user":
        raise APIError(400, "messages: the last message must be the user's", param="messages", code="invalid_value")
    rounds: List[Tuple[str, str]] = []
    pending: Optional[str] = None
    for message in messages[:-1]:
        if message.role == "user":
            pending = message.text() if pending is None else pending + "\n" + message.text()
        elif pending is not None:
            rounds.append((pending, message.text()))
            pending = None
    return _prompt(template, messages[-1].text(), rounds if history else [], limits, "messages")


def cut_at_stop(text: str, stops: List[str]) -> Optional[int]:
    """Where the first stop string begins in `text` (None: none occurs)."""
    found = [text.find(stop) for stop in stops if stop in text]
    return min(found) if found else None


def held_back(text: str, stops: List[str]) -> int:
    """How many trailing characters of `text` must wait: an incomplete character, or the start of a stop string
    (streaming never shows any part of a stop string)."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                hold = max(hold, size)
                break
    return hold
