"""infer/static/chat.html in a real headless Chromium (Debian's chromium + chromium-driver, selenium): what a user
sees (streamed answers, history, clear, errors) and what the server receives (history, sliders, key) from a
recording stub server (tests/openai_stub.py), then the real server on the demo export."""
from __future__ import annotations

import shutil

import pytest

from infer.server import serve_in_background
from openai_stub import FAIL_MESSAGE, LONG_PIECE, LONG_PIECES, StubServer, offline_answer

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
# Counts the distinct texts the newest assistant message shows while it streams.
WATCH_UPDATES = """
window.updates = [];
new MutationObserver(() => {
  const bubbles = document.querySelectorAll('#messages .message.assistant');
  const text = bubbles.length ? bubbles[bubbles.length - 1].textContent : '';
  if (text && text !== window.updates[window.updates.length - 1]) window.updates.push(text);
}).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
"""


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (`make test` installs them with apt-get)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def _open(browser, url: str) -> None:
    browser.get(url + "/")
    browser.execute_script(WATCH_UPDATES)


def _messages(browser) -> list:
    return [(e.get_attribute("class").split()[1], e.text)
            for e in browser.find_elements("css selector", "#messages .message")]


def _send(browser, text: str, timeout: float = 10) -> None:
    """Type a message, press Enter, wait until the answer has ended."""
    ended = _turns(browser)
    browser.execute_script("window.updates = [];")
    prompt = browser.find_element("id", "prompt")
    prompt.clear()
    prompt.send_keys(text + "\n")
    WebDriverWait(browser, timeout).until(lambda b: _turns(b) == ended + 1)


def _turns(browser) -> int:
    return int(browser.execute_script("return document.body.dataset.turns ?? 0"))


def _set_slider(browser, element_id: str, value: str) -> None:
    browser.execute_script("const s = document.getElementById(arguments[0]); s.value = arguments[1];"
                           "s.dispatchEvent(new Event('input'));", element_id, value)


def test_chat_page_streams_answers_keeps_history_and_clears(browser):
    with StubServer() as stub:
        _open(browser, stub.url)
        _send(browser, "hello")
        assert _messages(browser) == [("user", "hello"), ("assistant", "echo 1: hello")]
        updates = browser.execute_script("return window.updates")
        assert len(updates) > 2 and updates[-1] == "echo 1: hello"  # shown piece by piece as it streamed
        assert all("echo 1: hello".startswith(u) for u in updates)

        _send(browser, "and then?")
        assert _messages(browser)[2:] == [("user", "and then?"), ("assistant", "echo 2: and then?")]
        assert stub.recorded.requests[1]["messages"] == [
            {"role": "user", "content": "hello"}, {"role": "assistant", "content": "echo 1: hello"},
            {"role": "user", "content": "and then?"}]
        assert stub.recorded.requests[1]["stream"] is True

        browser.find_element("id", "clear").click()
        assert _messages(browser) == []
        _send(browser, "fresh start")
        assert _messages(browser) == [("user", "fresh start"), ("assistant", "echo 3: fresh start")]
        assert stub.recorded.requests[2]["messages"] == [{"role": "user", "content": "fresh start"}]


def test_chat_page_sends_the_sliders_and_key_and_shows_errors(browser):
    with StubServer(api_key="sekret") as stub:
        _open(browser, stub.url)
        _send(browser, "hello")  # no key yet: the server's 401 is shown, the turn is not kept
        assert browser.find_element("id", "error").text == "401: invalid API key"
        assert _messages(browser) == [] and browser.find_element("id", "prompt").get_attribute("value") == "hello"
        assert stub.recorded.requests == []  # refused at /v1/models already

        browser.find_element("id", "api-key").send_keys("sekret")
        _set_slider(browser, "max-tokens", "7")
        _set_slider(browser, "temperature", "0.3")
        _set_slider(browser, "top-p", "0.55")
        assert browser.find_element("id", "max-tokens-value").text == "7"
        _send(browser, "fail please")
        assert browser.find_element("id", "error").text == f"400: {FAIL_MESSAGE}"
        _send(browser, "hello")
        assert not browser.find_element("id", "error").is_displayed()
        assert _messages(browser) == [("user", "hello"), ("assistant", "echo 2: hello")]
        body = stub.recorded.requests[-1]
        assert (body["max_tokens"], body["temperature"], body["top_p"]) == (7, 0.3, 0.55)
        assert stub.recorded.keys[-1] == "Bearer sekret"
        assert body["messages"] == [{"role": "user", "content": "hello"}]  # the failed turn left no trace


def test_chat_page_stop_keeps_the_partial_answer(browser):
    with StubServer() as stub:
        _open(browser, stub.url)
        browser.find_element("id", "prompt").send_keys("long story\n")
        WebDriverWait(browser, 10).until(lambda b: len(b.execute_script("return window.updates")) >= 3)
        browser.find_element("id", "stop").click()
        WebDriverWait(browser, 10).until(lambda b: _turns(b) == 1)
        WebDriverWait(browser, 10).until(lambda b: stub.recorded.ended == ["cancelled"])
        bubble = browser.find_elements("css selector", "#messages .message.assistant")[0]
        assert "interrupted" in bubble.get_attribute("class")
        partial = bubble.get_property("textContent")
        assert partial.startswith("la la") and len(partial) < len(LONG_PIECE) * LONG_PIECES
        _send(browser, "next")
        assert stub.recorded.requests[-1]["messages"][1] == {"role": "assistant", "content": partial}


def test_chat_page_served_by_the_real_server(browser, exported):
    """GET / of serve_generation.py serves the page; its greedy answer equals the offline runner's."""
    question = "答案：巴黎，上下文：巴黎是法国的首都。"
    url, stop = serve_in_background(["--model_path", exported["dir"]])
    try:
        _open(browser, url)
        _set_slider(browser, "temperature", "0")
        _set_slider(browser, "max-tokens", "8")
        _send(browser, question, timeout=30)
        assert not browser.find_element("id", "error").is_displayed(), browser.find_element("id", "error").text
        expected = offline_answer(exported["dir"], question, 8)
        assert _messages(browser) == [("user", question), ("assistant", expected)]
        browser.find_element("id", "clear").click()
        assert _messages(browser) == []
    finally:
        stop()
