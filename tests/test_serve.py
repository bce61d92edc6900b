"""The server (issue 16): continuous batching in `infer.scheduler` against the offline runner, and the HTTP API
through the official `openai` client and raw HTTP (errors, streaming, stop strings, metrics).

The reference for every answer is `GLMRunner.generate` of that request alone, on the same export (the `exported`
fixture: the tiny demo GLM, tgt_length 12, so a long-running batch folds its slots every 12 steps)."""
from __future__ import annotations

import asyncio
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest

from infer.runner import GLMRunner
from infer.scheduler import WIDTH_STEP, ExportedBatch, Job, Scheduler, wait_until
from infer.server import CHAT_PAGE, EventOutbox, serve_in_background
from paddle_glm.args import InputError
from paddle_glm.decoding import DecodingConfig

TEXTS = ["答案：北京，上下文：北京是中国的首都，也是文化中心。", "hello world", "答案：三，上下文：一二三四五六七八九十",
         "天气很好，我们去公园散步吧", "abc def ghi jkl", "答案：长江，上下文：长江是中国最长的河流"]
KEY = "sk-test"


@pytest.fixture(scope="module")
def runner(exported):
    return GLMRunner(exported["dir"])


@pytest.fixture(scope="module")
def template(runner):
    return runner.template()


def reference(runner, template, text: str, history=(), **fields) -> list:
    """The texts `GLMRunner.generate` gives the request alone (the offline runner's answer)."""
    config = DecodingConfig(eos_token_id=template.stop_ids, pad_token_id=template.pad_id,
                            tokenizer_size=template.tokenizer_size, **fields)
    prompt = template.generation_example(template.prompt_ids(text, list(history), runner.config["src_length"])[0])
    return [template.response(s) for s in runner.generate([prompt], config).sequences]


class Recorder:
    """A scheduler listener: records the batch's size at each token, cancels after `cancel_after` steps."""

    def __init__(self, scheduler, cancel_after=None):
        self.scheduler, self.cancel_after = scheduler, cancel_after
        self.event, self.error, self.batch_rows = threading.Event(), None, []

    def tokens(self, job, live):
        self.batch_rows.append(self.scheduler.running_rows)
        if self.cancel_after is not None and job.generated.shape[1] >= self.cancel_after:
            job.cancel()
        return []

    def done(self, job, error):
        self.error = error
        self.event.set()


def serve_all(scheduler, requests, timeout: float) -> list:
    """Submit (example, config) pairs one after another to a started scheduler (later ones arrive while earlier
    ones decode), wait for every job, stop the scheduler; the finished jobs."""
    jobs = []
    try:
        for example, config in requests:
            job = Job(example, config, None)
            job.listener = Recorder(scheduler)
            scheduler.submit(job)
            jobs.append(job)
        for job in jobs:
            assert job.listener.event.wait(timeout) and job.listener.error is None
    finally:
        scheduler.stop()
    return jobs


def decoding(template, index: int) -> DecodingConfig:
    """A mix of settings: greedy and seeded sampling (1-3 samples), penalties, top-k/top-p, lengths 2..12."""
    sampling = index % 2 == 1
    return DecodingConfig(
        eos_token_id=template.stop_ids, pad_token_id=template.pad_id, tokenizer_size=template.tokenizer_size,
        decode_strategy="sampling" if sampling else "greedy_search", max_length=2 + index % 11, seed=index,
        num_return_sequences=1 + index % 3 if sampling else 1, top_k=5 if index % 4 == 1 else 0,
        top_p=0.9 if index % 4 == 3 else 1.0, temperature=0.7 if index % 3 == 0 else 1.0,
        repetition_penalty=1.3 if index % 5 == 0 else 1.0, min_length=index % 3,
        no_repeat_ngram_size=2 if index % 7 == 0 else 0)


@pytest.mark.parametrize("backend", ["paddle", "onnxruntime"])
def test_scheduler_batches_requests_without_changing_their_tokens(exported, backend):
    """30 jobs (greedy, seeded sampling with several rows, penalties) arriving while others decode, over > 2
    folds of the own slots: every job's tokens equal the runner's for that job alone, and jobs did share steps."""
    runner = GLMRunner(exported["dir"], backend)
    template = runner.template()
    scheduler = Scheduler(ExportedBatch(runner), max_batch_size=7, max_queue=100).start()
    texts = [TEXTS[index % len(TEXTS)] * (1 + index % 3) for index in range(30)]
    src_length = runner.config["src_length"]
    requests = ((template.generation_example(template.prompt_ids(text, (), src_length)[0]), decoding(template, index))
                for index, text in enumerate(texts))
    jobs = serve_all(scheduler, requests, timeout=60)
    for job in jobs:
        assert job.sequences == runner.generate([job.example], job.config).sequences
    assert max(max(job.listener.batch_rows) for job in jobs) >= 5  # they were batched together
    assert scheduler.steps > 2 * runner.config["tgt_length"]  # the slots were folded more than once


def test_scheduler_cancelled_job_leaves_before_the_next_step(runner, template):
    scheduler = Scheduler(ExportedBatch(runner), max_batch_size=4).start()
    try:
        example = template.generation_example(template.prompt_ids(TEXTS[0], ())[0])
        # an eos id the model never generates: only cancelling ends the job early
        config = DecodingConfig(eos_token_id=template.tokenizer_size + 5, pad_token_id=template.pad_id, max_length=12)
        job = Job(example, config, None)
        job.listener = Recorder(scheduler, cancel_after=3)
        scheduler.submit(job)
        assert job.listener.event.wait(30)
        assert job.generated.shape[1] == 3 and scheduler.running_rows == 0 and scheduler.batch.rows == 0
    finally:
        scheduler.stop()


def test_scheduler_beam_search_runs_between_steps(runner, template):
    scheduler = Scheduler(ExportedBatch(runner), max_batch_size=4).start()
    requests = [(template.generation_example(template.prompt_ids(TEXTS[index], ())[0]),
                 DecodingConfig(eos_token_id=template.stop_ids, pad_token_id=template.pad_id, max_length=10,
                                decode_strategy=strategy, num_beams=3 if strategy == "beam_search" else 1,
                                num_return_sequences=2 if strategy != "greedy_search" else 1, seed=5,
                                tokenizer_size=template.tokenizer_size))
                for index, strategy in enumerate(["sampling", "beam_search", "greedy_search"])]
    jobs = serve_all(scheduler, requests, timeout=30)
    for job in jobs:
        assert job.sequences == runner.generate([job.example], job.config).sequences


# ---------------------------------------------------------------- over HTTP


@pytest.fixture(scope="module")
def server(exported):
    url, stop = serve_in_background(["--model_path", exported["dir"], "--max_batch_size", "8", "--api_key", KEY,
                                     "--max_body_bytes", "4096"])
    yield url
    stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


def test_completions_equal_the_offline_runner(client, runner, template):
    greedy = client.completions.create(model="export", prompt=TEXTS[:3], max_tokens=9, temperature=0)
    assert [c.text for c in greedy.choices] == [reference(runner, template, t, max_length=9)[0] for t in TEXTS[:3]]
    assert greedy.usage.completion_tokens > 0 and greedy.usage.prompt_tokens > 3
    sampled = client.completions.create(model="export", prompt=TEXTS[1], max_tokens=12, n=3, seed=11, top_p=0.9,
                                        temperature=0.8, extra_body={"repetition_penalty": 1.2, "top_k": 8})
    assert [c.text for c in sampled.choices] == reference(
        runner, template, TEXTS[1], max_length=12, decode_strategy="sampling", num_return_sequences=3, seed=11,
        top_p=0.9, top_k=8, temperature=0.8, repetition_penalty=1.2)
    beams = client.completions.create(model="export", prompt=TEXTS[0], max_tokens=10, n=2,
                                      extra_body={"num_beams": 3, "length_penalty": 0.7, "no_repeat_ngram_size": 2})
    assert [c.text for c in beams.choices] == reference(
        runner, template, TEXTS[0], max_length=10, decode_strategy="beam_search", num_beams=3,
        num_return_sequences=2, length_penalty=0.7, no_repeat_ngram_size=2)


def test_chat_renders_history_with_the_template(client, runner, template):
    messages = [{"role": "system", "content": "ignored"}, {"role": "user", "content": TEXTS[0]},
                {"role": "assistant", "content": "好的"}, {"role": "user", "content": TEXTS[3]}]
    answer = client.chat.completions.create(model="export", messages=messages, max_tokens=8, temperature=0)
    assert answer.choices[0].message.content == reference(runner, template, TEXTS[3], [(TEXTS[0], "好的")],
                                                          max_length=8)[0]
    assert answer.choices[0].message.role == "assistant"
    assert answer.usage.prompt_tokens == len(template.prompt_ids(TEXTS[3], [(TEXTS[0], "好的")])[0]) + 1  # + <sop>


def test_streaming_gives_the_same_text_and_usage_last(client, server, runner, template):
    expected = reference(runner, template, TEXTS[2], max_length=12, decode_strategy="sampling", seed=4,
                         num_return_sequences=2)
    chunks = list(client.chat.completions.create(model="export", messages=[{"role": "user", "content": TEXTS[2]}],
                                                 max_tokens=12, seed=4, n=2, stream=True))
    texts = ["", ""]
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert {c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason} <= {"stop", "length"}
    with httpx.stream("POST", server + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": TEXTS[0], "max_tokens": 5, "stream": True, "temperature": 0}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-2]) == reference(
        runner, template, TEXTS[0], max_length=5)[0]
    assert json.loads(lines[-2][6:])["usage"]["completion_tokens"] == 5


def test_stop_strings_are_never_streamed(client, runner, template):
    """A stop string of three tokens from the middle of a sampled answer: neither its first characters (generated
    two steps before it completes) nor anything after it is streamed."""
    for seed in range(50):
        full = reference(runner, template, TEXTS[5], max_length=12, decode_strategy="sampling", seed=seed)[0]
        at = next((k for k in range(2, len(full) - 3) if full.find(full[k:k + 3]) == k), None)
        if at is not None:
            break
    stop = full[at:at + 3]
    request = dict(model="export", prompt=TEXTS[5], max_tokens=12, seed=seed, stop=[stop, "never-there"])
    streamed = list(client.completions.create(stream=True, **request))
    text = "".join(c.choices[0].text for c in streamed if c.choices)
    assert text == full[:at]  # not one character of the stop string went out
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "stop"
    plain = client.completions.create(**request)
    assert plain.choices[0].text == full[:at] and plain.choices[0].finish_reason == "stop"


def test_concurrent_requests_equal_each_alone(client, runner, template):
    """16 requests from 8 threads (greedy of different lengths; seeded sampling with 2 samples) share the batch."""
    def settings(index):
        if index % 2:
            return dict(max_tokens=12, seed=index, n=2), dict(max_length=12, decode_strategy="sampling", seed=index,
                                                               num_return_sequences=2)
        return dict(max_tokens=4 + index % 9, temperature=0), dict(max_length=4 + index % 9)

    def ask(index):
        answer = client.completions.create(model="export", prompt=TEXTS[index % len(TEXTS)], **settings(index)[0])
        return [choice.text for choice in answer.choices]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(16)))
    for index, got in enumerate(answers):  # the references after: Paddle's eager ops are not thread-safe
        assert got == reference(runner, template, TEXTS[index % len(TEXTS)], **settings(index)[1])


def test_errors_have_openai_shape_and_status(client, server, exported):
    def bad(status, param=None, words=(), **request):
        with pytest.raises(openai.APIStatusError) as caught:
            client.completions.create(**{"model": "export", "prompt": "hi", **request})
        error = caught.value.body
        assert caught.value.status_code == status and set(error) >= {"message", "type", "param", "code"}
        assert error["param"] == param and all(word in error["message"] for word in words), error
        return caught.value

    bad(400, "temperature", ["temperature"], temperature=-1)
    bad(400, "max_tokens", ["12"], max_tokens=13)  # the export's tgt_length
    bad(400, "n", ["--max_batch_size 8"], n=9)
    bad(400, "n", ["greedy"], n=2, temperature=0)
    bad(400, "stop", ["at most 4"], stop=["a", "b", "c", "d", "e"])
    bad(400, "stream", ["beam search cannot stream"], stream=True, extra_body={"num_beams": 2})
    bad(400, "top_p", ["top_p"], top_p=1.5)
    bad(400, "max_tokens", [], max_tokens="many")
    src_length = GLMRunner(exported["dir"]).config["src_length"]
    bad(400, "prompt", [f"src_length of {src_length}"], prompt="长" * (src_length + 1))
    bad(404, "model", ["nope"], model="nope")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    headers = {"Authorization": f"Bearer {KEY}"}
    cases = [(b'{"prompt": "hi",', 422, "JSON"), (b'{"prompt": "\xff"}', 422, "UTF-8"),
             (b'{"prompt": "' + b"x" * 5000 + b'"}', 413, "limit")]
    for body, status, word in cases:
        answer = httpx.post(server + "/v1/completions", content=body, headers=headers)
        assert answer.status_code == status and word in answer.json()["error"]["message"]
    answer = httpx.get(server + "/v2/nothing")
    assert answer.status_code == 404 and answer.json()["error"]["type"] == "not_found_error"


def test_models_health_and_metrics(client, server):
    assert [model.id for model in client.models.list().data] == ["export"]
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    client.completions.create(model="export", prompt="hi", max_tokens=3, temperature=0)
    text = httpx.get(server + "/metrics").text
    for name in ("paddle_glm_requests_total", "paddle_glm_queue_depth", "paddle_glm_batch_rows",
                 "paddle_glm_generated_tokens_total", "paddle_glm_time_to_first_token_seconds_bucket",
                 "paddle_glm_time_per_output_token_seconds_bucket"):
        assert name in text
    assert 'paddle_glm_requests_total{endpoint="/v1/completions",status="200"}' in text
    page = httpx.get(server + "/")  # the chat page (infer/static/chat.html)
    with open(CHAT_PAGE, encoding="utf-8") as handle:
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.text == handle.read()


def test_busy_server_answers_429_and_slow_requests_504(exported):
    url, stop = serve_in_background(["--model_path", exported["dir"], "--max_batch_size", "1", "--max_queue", "1"])
    try:
        def ask(_):
            return httpx.post(url + "/v1/completions", timeout=60,
                              json={"prompt": TEXTS[0], "max_tokens": 12, "temperature": 0,
                                    "extra": "ignored"})

        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(ask, range(24)))
        statuses = {answer.status_code for answer in answers}
        assert statuses == {200, 429}
        busy = next(answer for answer in answers if answer.status_code == 429)
        assert busy.headers["Retry-After"] == "1" and busy.json()["error"]["code"] == "queue_full"
    finally:
        stop()
    url, stop = serve_in_background(["--model_path", exported["dir"], "--request_timeout", "0.000001"])
    try:
        answer = httpx.post(url + "/v1/completions", json={"prompt": TEXTS[0], "max_tokens": 12})
        assert answer.status_code == 504 and answer.json()["error"]["code"] == "timeout"
        with httpx.stream("POST", url + "/v1/completions",
                          json={"prompt": TEXTS[0], "max_tokens": 12, "stream": True}) as response:
            lines = [line for line in response.iter_lines() if line]
        assert json.loads(lines[-2][6:])["error"]["code"] == "timeout" and lines[-1] == "data: [DONE]"
    finally:
        stop()


def test_dynamic_graph_serving_and_a_client_that_disconnects(demo_base):
    """A checkpoint served in dynamic graph (--model_name_or_path, here with room for 200 new tokens) answers as
    `generation.generate` of that model does; a streaming client that hangs up after two chunks is cancelled within
    a step (its 200 tokens are not generated) and counted as 499."""
    from paddle_glm.generation import generate
    from paddle_glm.models import load_model, load_template

    url, stop = serve_in_background(["--model_name_or_path", demo_base["model"], "--tgt_length", "200"])
    request = {"prompt": TEXTS[0], "max_tokens": 200, "min_tokens": 200, "temperature": 0}
    try:
        answer = httpx.post(url + "/v1/completions", json={**request, "max_tokens": 10, "min_tokens": 0}, timeout=60)
        template, model = load_template(demo_base["model"]), load_model(demo_base["model"])
        model.eval()
        config = DecodingConfig(eos_token_id=template.stop_ids, pad_token_id=template.pad_id, max_length=10,
                                tokenizer_size=template.tokenizer_size)
        prompt = template.generation_example(template.prompt_ids(TEXTS[0], (), 56)[0])
        assert answer.json()["choices"][0]["text"] == template.response(generate(model, [prompt], config).sequences[0])
        with httpx.stream("POST", url + "/v1/completions", json={**request, "stream": True}) as response:
            lines = response.iter_lines()
            next(lines), next(lines)  # two chunks, then hang up
        assert wait_until(lambda: 'status="499"' in httpx.get(url + "/metrics").text, timeout=10)
        assert wait_until(lambda: _metric(url, "paddle_glm_batch_rows") == 0, timeout=10)
        assert _metric(url, "paddle_glm_generated_tokens_total") < 10 + 100
    finally:
        stop()


def _metric(url: str, name: str) -> float:
    lines = [line for line in httpx.get(url + "/metrics").text.splitlines() if line.startswith(name + " ")]
    return float(lines[0].split()[-1])


def test_chatglm3_export_serves_chat_with_its_template(tmp_path):
    """Another family through the same server: a tiny random ChatGLM3 (1-D positions, 2 K/V groups for 4 heads,
    several stop ids), its chat rendered with THUDM's role tokens and history, greedy and seeded sampling equal to
    the runner's."""
    from test_chatglm2_family import TOKENIZER_MODEL, save_tiny

    if not os.path.isfile(TOKENIZER_MODEL):
        pytest.skip(f"needs ChatGLM3's sentencepiece model at {TOKENIZER_MODEL} (../shared/assets)")
    from export.exporter import main as export

    export(["--model_name_or_path", save_tiny(tmp_path / "model"), "--output_path", str(tmp_path / "export"),
            "--tgt_length", "8", "--src_length", "64"])
    runner = GLMRunner(str(tmp_path / "export"))
    template = runner.template()
    assert runner.config["family"] == "chatglm2" and runner.config["kv_heads"] < runner.config["num_attention_heads"]
    url, stop = serve_in_background(["--model_path", str(tmp_path / "export")])
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好，有什么可以帮你？"},
                    {"role": "user", "content": "北京在哪里？"}]
        history = [("你好", "你好，有什么可以帮你？")]
        greedy = client.chat.completions.create(model="export", messages=messages, max_tokens=8, temperature=0)
        sampled = client.chat.completions.create(model="export", messages=messages, max_tokens=8, seed=3, n=2)
        streamed = ["", ""]
        for chunk in client.chat.completions.create(model="export", messages=messages, max_tokens=8, seed=3, n=2,
                                                    stream=True):
            for choice in chunk.choices:
                streamed[choice.index] += choice.delta.content or ""
    finally:
        stop()
    assert greedy.usage.completion_tokens > 0 and all(c.message.content for c in sampled.choices)
    assert greedy.choices[0].message.content == reference(runner, template, "北京在哪里？", history, max_length=8)[0]
    assert streamed == [c.message.content for c in sampled.choices]
    assert [c.message.content for c in sampled.choices] == reference(
        runner, template, "北京在哪里？", history, max_length=8, decode_strategy="sampling", seed=3,
        num_return_sequences=2)


@pytest.mark.parametrize("budget,before,first_step", [(512, [0, 0, 0], [3, 3, 3]), (1, [0, 1, 2], [1, 2, 3])])
def test_prefill_budget_bounds_the_prompts_joining_between_two_steps(runner, template, budget, before, first_step):
    """Three queued prompts join together within the default budget; with a budget of one token, one prompt a round
    (at least one always joins): the batch each job's first decode step runs in grows 1, 2, 3. A job's first token
    comes right after its own prompt pass, before its rows join (the rows it sees: those of earlier rounds)."""
    scheduler = Scheduler(ExportedBatch(runner), max_batch_size=4, prefill_tokens=budget)
    config = DecodingConfig(eos_token_id=template.tokenizer_size + 5, pad_token_id=template.pad_id, max_length=6)
    jobs = [Job(template.generation_example(template.prompt_ids(text, ())[0]), config, None) for text in TEXTS[:3]]
    for job in jobs:
        job.listener = Recorder(scheduler)
        scheduler.submit(job)  # all queued before the loop starts
    scheduler.start()
    try:
        assert all(job.listener.event.wait(30) and job.listener.error is None for job in jobs)
    finally:
        scheduler.stop()
    assert [job.listener.batch_rows[0] for job in jobs] == before
    assert [job.listener.batch_rows[1] for job in jobs] == first_step


def test_model_prefix_served_name_and_chat_without_history(exported, runner, template):
    """--model_path DIR --model_prefix P serves DIR/P under --served_model_name; --chat_history false answers the
    last user message alone (GLM's question-generation models); --max_prefill_tokens and --batch_wait_ms reach the
    scheduler, a negative wait is refused."""
    from infer.server import Service, parse_arguments

    parent, prefix = os.path.split(exported["dir"].rstrip("/"))
    flags = ["--model_path", parent, "--model_prefix", prefix, "--served_model_name", "qg", "--chat_history", "false"]
    url, stop = serve_in_background(flags)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert [model.id for model in client.models.list().data] == ["qg"]
        messages = [{"role": "user", "content": TEXTS[0]}, {"role": "assistant", "content": "好的"},
                    {"role": "user", "content": TEXTS[3]}]
        answer = client.chat.completions.create(model="qg", messages=messages, max_tokens=8, temperature=0)
        assert answer.choices[0].message.content == reference(runner, template, TEXTS[3], max_length=8)[0]
        assert answer.choices[0].message.content != reference(runner, template, TEXTS[3], [(TEXTS[0], "好的")],
                                                              max_length=8)[0]
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="export", messages=messages, max_tokens=8, temperature=0)
    finally:
        stop()
    service = Service(parse_arguments(["--model_path", exported["dir"], "--max_prefill_tokens", "7",
                                       "--batch_wait_ms", "2.5"]))
    try:
        assert service.scheduler.prefill_tokens == 7 and service.scheduler.batch_wait == 0.0025
    finally:
        service.close()
    with pytest.raises(InputError, match=r"--batch_wait_ms -1.0: must lie in \[0, 1000\]"):
        parse_arguments(["--model_path", exported["dir"], "--batch_wait_ms", "-1"])


def test_a_prompt_arriving_during_a_prompt_pass_joins_that_round(runner, template):
    """Requests that arrive while another's prompt is passed get their own pass in the same round, before the next
    decode step (their first token does not wait for it), and still decode as they do alone."""
    scheduler = Scheduler(ExportedBatch(runner), max_batch_size=4)
    config = DecodingConfig(eos_token_id=template.tokenizer_size + 5, pad_token_id=template.pad_id, max_length=5)
    first, late = (Job(template.generation_example(template.prompt_ids(text, ())[0]), config, None)
                   for text in TEXTS[:2])
    for job in (first, late):
        job.listener = Recorder(scheduler)
    prefill = scheduler.batch.prefill

    def arriving_meanwhile(examples, rows):
        if examples[0] is first.example:
            scheduler.submit(late)
        return prefill(examples, rows)

    scheduler.batch.prefill = arriving_meanwhile
    scheduler.submit(first)
    scheduler.start()
    try:
        assert all(job.listener.event.wait(30) and job.listener.error is None for job in (first, late))
    finally:
        scheduler.stop()
    # at each job's first token no rows ran yet: both joined in one round; then both decode together
    assert first.listener.batch_rows[:2] == late.listener.batch_rows[:2] == [0, 2]
    for job in (first, late):
        assert job.sequences == runner.generate([job.example], job.config).sequences


def test_requests_arriving_within_batch_wait_share_one_prompt_pass(runner, template):
    """With --batch_wait_ms, a request arriving at an idle server waits until none arrived for that long: requests
    arriving 0.3 s apart with a 0.5 s wait are passed together (one prompt pass for the three, though the third
    came 0.6 s after the first), and each decodes as it does alone."""
    scheduler = Scheduler(ExportedBatch(runner), max_batch_size=4, batch_wait=0.5)
    config = DecodingConfig(eos_token_id=template.tokenizer_size + 5, pad_token_id=template.pad_id, max_length=4)
    jobs = [Job(template.generation_example(template.prompt_ids(text, ())[0]), config, None) for text in TEXTS[:3]]
    passes = []
    prefill = scheduler.batch.prefill

    def recorded(examples, rows):
        passes.append(len(examples))
        return prefill(examples, rows)

    scheduler.batch.prefill = recorded
    scheduler.start()
    try:
        for job in jobs:
            job.listener = Recorder(scheduler)
            scheduler.submit(job)
            threading.Event().wait(0.3)
        assert all(job.listener.event.wait(30) and job.listener.error is None for job in jobs)
    finally:
        scheduler.stop()
    assert passes == [3]
    for job in jobs:
        assert job.sequences == runner.generate([job.example], job.config).sequences


def test_packed_prompts_and_batch_width_give_each_row_its_logits_alone(runner, template):
    """Prompts packed into one pass (`ExportedBatch.prefill`) get the logits and fill the cache as in a pass of
    their own: each row's first logits and steps equal the runner's for its prompt alone. The shared segment holds
    the batch's longest prompt rounded up to WIDTH_STEP columns, not the export's src_length (every step reads it
    whole): it widens when a longer prompt joins and narrows when that row leaves."""
    def example(text):
        return template.generation_example(template.prompt_ids(text, ())[0])

    def alone(prompt, tokens):
        stepper = runner.stepper([prompt], DecodingConfig(template.stop_ids, template.pad_id, max_length=4))
        return [stepper.prefill(1)[0]] + [stepper.step(np.array([token]))[0] for token in tokens]

    short, other, long = example(TEXTS[1]), example(TEXTS[3]), example(TEXTS[0] * 2)
    assert len(short["input_ids"]) < WIDTH_STEP < len(long["input_ids"]) <= 3 * WIDTH_STEP
    tokens = [5, 7, 9]
    batch = ExportedBatch(runner)
    first, rows = batch.prefill([short, other], [1, 2])  # one pass; `other` continued by two rows
    batch.add(rows)
    assert batch.prompt_width == WIDTH_STEP and batch.shared[0].shape[2] == WIDTH_STEP + batch.capacity
    got = [np.stack([first[0][0], first[1][0], first[1][1]]), batch.step(np.array(tokens))]
    batch.keep(np.array([0, 1]))  # one of `other`'s rows left
    late, rows = batch.prefill([long], [1])
    batch.add(rows)  # joins between two steps: the segment widens
    wide = -(-len(long["input_ids"]) // WIDTH_STEP) * WIDTH_STEP
    assert batch.prompt_width == wide and batch.shared[0].shape[2] == wide + batch.capacity
    got.append(batch.step(np.array(tokens)))
    batch.keep(np.array([0, 1]))  # the long prompt's request left
    assert batch.prompt_width == WIDTH_STEP and batch.shared[0].shape[2] == WIDTH_STEP + batch.capacity
    got.append(batch.step(np.array(tokens[:2])))
    expected = [alone(short, tokens[:1] * 3), alone(other, tokens[1:2] * 3)]  # each row is fed its token each step
    np.testing.assert_allclose(got[0], [expected[0][0], expected[1][0], expected[1][0]], rtol=1e-4, atol=1e-4)
    for step in range(1, 4):
        np.testing.assert_allclose(got[step][:2], [expected[0][step], expected[1][step]], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(late[0][0], alone(long, [])[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[2][2], alone(long, tokens[2:])[1], rtol=1e-4, atol=1e-4)
    assert batch.prompt_width < batch.max_prompt_width


def test_outbox_wakes_the_loop_once_per_flush_and_delivers_every_event_in_order():
    """Events put from another thread wait for `flush`, which wakes the loop once however many there are (and not
    again before that wake-up ran); each queue gets its events in order."""
    loop = asyncio.new_event_loop()
    wakes = []
    wake = loop.call_soon_threadsafe
    loop.call_soon_threadsafe = lambda callback: (wakes.append(callback), wake(callback))
    outbox = EventOutbox(loop)
    queues = [asyncio.Queue(), asyncio.Queue()]
    send = [outbox.sender(q) for q in queues]

    def burst(start):
        for i in range(start, start + 10):
            send[i % 2](("delta", i))
        outbox.flush()
        outbox.flush()

    async def drain(count):
        got = []
        while len(got) < count:
            got += [q.get_nowait() for q in queues for _ in range(q.qsize())]
            await asyncio.sleep(0.001)
        return got

    thread = threading.Thread(target=burst, args=(0,))
    thread.start()
    thread.join()
    assert len(wakes) == 1 and all(q.empty() for q in queues)
    got = loop.run_until_complete(drain(10))
    assert sorted(got) == [("delta", i) for i in range(10)]
    assert [e for e in got if e[1] % 2] == [("delta", i) for i in range(1, 10, 2)]  # each queue in order
    outbox.flush()  # nothing new: no wake-up
    burst(10)
    assert len(wakes) == 2
    assert len(loop.run_until_complete(drain(10))) == 10
    loop.close()
    send[0](("done", None))
    outbox.flush()  # a closed loop: dropped, no error
