"""chat_generation.py through a pseudo-terminal (pexpect): what a user types and sees, and what the server receives
(a recording stub server, tests/openai_stub.py), then the real server on the demo export."""
from __future__ import annotations

import io
import os
import signal
import sys

import pexpect

from openai_stub import LONG_PIECE, LONG_PIECES, MODEL, StubServer, offline_answer

ROOT = os.path.join(os.path.dirname(__file__), "..")
PROMPT = "User: "


def _spawn(*flags: str, timeout: float = 10, preexec_fn=None) -> pexpect.spawn:
    env = {**os.environ, "TERM": "dumb", "PYTHONPATH": ROOT}  # dumb: no readline escape codes in the output
    child = pexpect.spawn(sys.executable, [os.path.join(ROOT, "chat_generation.py"), *flags], cwd=ROOT, env=env,
                          encoding="utf-8", timeout=timeout, dimensions=(50, 400), preexec_fn=preexec_fn)
    child.logfile_read = io.StringIO()  # the whole transcript
    return child


def _ask(child: pexpect.spawn, text: str) -> str:
    """Send one message; the answer as printed, once the next prompt is shown."""
    child.sendline(text)
    child.expect_exact("Assistant: ")
    child.expect_exact(f"\r\n\r\n{PROMPT}")
    return child.before.strip()


def _quit(child: pexpect.spawn, command: str = "exit") -> None:
    child.sendline(command)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before


def test_chat_cli_sends_history_clears_it_and_exits():
    with StubServer() as stub:
        child = _spawn("--url", stub.url, "--temperature", "0.5", "--top_k", "3", "--seed", "7")
        child.expect_exact(f"Chat with {MODEL}")
        assert _ask(child, "hello") == "echo 1: hello"
        assert _ask(child, "and then?") == "echo 2: and then?"
        first, second = stub.recorded.requests
        assert first["messages"] == [{"role": "user", "content": "hello"}]
        assert second["messages"] == [{"role": "user", "content": "hello"},
                                      {"role": "assistant", "content": "echo 1: hello"},
                                      {"role": "user", "content": "and then?"}]
        assert all(r["stream"] is True and r["model"] == MODEL for r in stub.recorded.requests)
        assert (second["temperature"], second["top_k"], second["seed"]) == (0.5, 3, 7)
        assert "top_p" not in second and "max_tokens" not in second  # unset flags: the server's defaults

        child.sendline("clear")
        child.expect_exact(f"Chat with {MODEL}")
        assert _ask(child, "fresh start") == "echo 3: fresh start"
        assert stub.recorded.requests[-1]["messages"] == [{"role": "user", "content": "fresh start"}]
        _quit(child)


def _ignore_ctrl_c() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_chat_cli_ctrl_c_interrupts_the_answer_and_the_session_goes_on():
    """Also when the CLI starts with SIGINT ignored, as a background job of a shell without job control starts it
    (`make test` launched that way): the CLI takes Ctrl-C back."""
    with StubServer() as stub:
        child = _spawn("--url", stub.url, preexec_fn=_ignore_ctrl_c)
        child.expect_exact(PROMPT)
        child.sendline("long story please")
        child.expect_exact(LONG_PIECE * 5)  # the answer is streaming
        child.sendintr()
        child.expect_exact("[interrupted]")
        child.expect_exact(PROMPT)
        assert _ask(child, "still there?") == "echo 2: still there?"
        assert stub.recorded.ended[0] == "cancelled"  # the client dropped the connection: the server stopped
        kept = stub.recorded.requests[-1]["messages"][1]["content"]  # THUDM's cli_demo keeps what was shown
        assert kept.startswith(LONG_PIECE * 5) and len(kept) < len(LONG_PIECE) * LONG_PIECES
        child.sendintr()  # at the prompt Ctrl-C only starts a new line
        child.expect_exact(PROMPT)
        _quit(child, "stop")


def test_chat_cli_reports_server_errors_and_keeps_the_session():
    with StubServer(api_key="sekret") as stub:
        child = _spawn("--url", stub.url, "--api_key", "wrong")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 1 and "error: the server answered 401: invalid API key" in child.before

        child = _spawn("--url", stub.url, "--api_key", "sekret")
        child.expect_exact(PROMPT)
        child.sendline("fail now")
        child.expect_exact("error: the server answered 400: max_tokens 9999 exceeds")
        assert _ask(child, "ok") == "echo 2: ok"
        assert stub.recorded.requests[-1]["messages"] == [{"role": "user", "content": "ok"}]  # the failed turn is gone
        assert stub.recorded.keys[-1] == "Bearer sekret"
        _quit(child)


def test_chat_cli_one_line_errors_for_bad_flags_and_no_server():
    child = _spawn("--url", "http://127.0.0.1:9", "--top_p", "0")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2 and "--top_p 0.0: must be in (0, 1]" in child.before
    child = _spawn("--url", "http://127.0.0.1:9")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1 and "error: cannot reach http://127.0.0.1:9" in child.before
    assert "Traceback" not in child.before


def test_chat_cli_serves_the_demo_export_in_process(exported):
    """No --url: the CLI starts the real server on the export and streams its greedy answers, equal to the
    offline runner's."""
    first, second = "答案：巴黎，上下文：巴黎是法国的首都。", "答案：长江"
    child = _spawn("--model_path", exported["dir"], "--temperature", "0", "--max_tokens", "8", timeout=60)
    child.expect_exact(PROMPT)
    answer = offline_answer(exported["dir"], first, 8)
    assert _ask(child, first) == answer.strip()
    assert _ask(child, second) == offline_answer(exported["dir"], second, 8, [(first, answer)]).strip()
    _quit(child)
    transcript = child.logfile_read.getvalue()
    assert "INFO" not in transcript and "WARNING" not in transcript  # quiet logs: nothing but the chat
