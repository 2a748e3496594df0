"""The OpenAI-compatible server's errors and failures: bad requests get OpenAI-shaped 4xx bodies
naming the problem, never a 500 or a dead engine; disconnects abort requests and free their pages;
an engine failure fails its requests and /health says so. Through the official `openai` client and
httpx against conftest.py's `served` (or a server on tests/fake_engine.py where the engine must fail).
"""

import logging
import re
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
from fake_engine import FakeEngine
from helpers import CHAT, NAME, PROMPT, idle, live_server

from jaxinfer.api import create_app
from jaxinfer.api.routes.app import MAX_JSON_DEPTH
from jaxinfer.async_engine import AsyncLLMEngine

# -- errors --------------------------------------------------------------------------------------

def assert_openai_error(response: httpx.Response, status: int, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param


C, CHAT_PATH = "/v1/completions", "/v1/chat/completions"


@pytest.mark.parametrize("path, body, param", [
    (C, {"prompt": PROMPT, "max_tokens": "ten"}, "max_tokens"),
    (C, {"prompt": PROMPT, "max_tokens": -1}, "max_tokens"),
    (C, {"prompt": PROMPT, "max_tokens": 10**9}, "max_tokens"),
    (C, {"prompt": PROMPT, "temperature": "hot"}, "temperature"),
    (C, {"prompt": PROMPT, "temperature": -0.5}, "temperature"),
    (C, {"prompt": PROMPT, "top_p": 0}, "top_p"),
    (C, {"prompt": PROMPT, "n": 0}, "n"),
    (C, {"prompt": PROMPT, "n": 1000}, "n"),
    (C, {"prompt": PROMPT, "stop": [""]}, "stop"),
    (C, {"prompt": PROMPT, "seed": "x"}, "seed"),
    (C, {"prompt": PROMPT, "logprobs": 50}, "logprobs"),
    (C, {"prompt": PROMPT, "best_of": 3}, "best_of"),
    (C, {"prompt": PROMPT, "echo": "yes"}, "echo"),
    (C, {"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),  # 0 only with echo
    (C, {"prompt": PROMPT, "prompt_logprobs": 21}, "prompt_logprobs"),
    (C, {"prompt": PROMPT, "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    (CHAT_PATH, {"messages": CHAT, "prompt_logprobs": -1}, "prompt_logprobs"),
    (CHAT_PATH, {"messages": CHAT, "prompt_logprobs": 0, "stream": True}, "prompt_logprobs"),
    (C, {"prompt": PROMPT, "suffix": "!"}, "suffix"),
    (C, {"prompt": PROMPT, "stream_options": {"include_usage": True}}, "stream_options"),
    (C, {}, "prompt"),
    (C, {"prompt": 42}, "prompt"),
    (C, {"prompt": ""}, "prompt"),
    (C, {"prompt": [1, 2, 10**9]}, "prompt"),
    (C, {"prompt": [1] * 600}, "prompt"),  # longer than max_model_len
    (C, {"prompt": PROMPT, "cache_salt": ""}, "cache_salt"),
    (CHAT_PATH, {"messages": CHAT, "cache_salt": 7}, "cache_salt"),
    (CHAT_PATH, {"messages": []}, "messages"),
    (CHAT_PATH, {"messages": "hi"}, "messages"),
    (CHAT_PATH, {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    (CHAT_PATH, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    (CHAT_PATH, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content"),
    (CHAT_PATH, {"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
    (CHAT_PATH, {"messages": CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (CHAT_PATH, {"messages": CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
    (CHAT_PATH, {"messages": CHAT, "tools": [{"type": "function"}]}, "tools[0]"),
    (CHAT_PATH, {"messages": CHAT, "functions": [{"name": "f"}]}, "functions"),
])
def test_bad_requests_get_400_naming_the_field(served, path, body, param):
    assert_openai_error(httpx.post(served.url + path, json={"model": NAME, **body}), 400, param)


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
def test_malformed_bodies_get_400(served, content):
    response = httpx.post(served.url + C, content=content, headers={"content-type": "application/json"})
    assert_openai_error(response, 400)


def nested_list(depth: int) -> list:
    """`depth` levels of arrays: [[...[]...]]."""
    value = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_json_nested_to_the_depth_limit_is_served(served):
    """The body is level 1, so a field nests MAX_JSON_DEPTH - 1 levels at most (unknown fields are ignored)."""
    response = served.client.completions.create(model=NAME, prompt=PROMPT, max_tokens=1,
                                                extra_body={"metadata": nested_list(MAX_JSON_DEPTH - 1)})
    assert response.usage.completion_tokens == 1


def test_json_nested_past_the_limit_gets_400_naming_the_problem(served):
    with pytest.raises(openai.BadRequestError) as raised:
        served.client.completions.create(model=NAME, prompt=PROMPT, max_tokens=1,
                                         extra_body={"metadata": nested_list(MAX_JSON_DEPTH)})
    error = raised.value.body
    assert error["code"] == "json_too_deep" and f"more than {MAX_JSON_DEPTH} levels deep" in error["message"]
    assert error["type"] == "invalid_request_error"


def test_json_nested_past_the_parsers_own_limit_gets_400_not_500(served):
    """100,000 levels: Python's JSON parser gives up with a RecursionError, which must be a 400 too."""
    depth = 100_000
    content = b'{"prompt": "hi", "metadata": ' + b"[" * depth + b"]" * depth + b"}"
    response = httpx.post(served.url + C, content=content, headers={"content-type": "application/json"})
    assert_openai_error(response, 400)
    assert response.json()["error"]["code"] == "json_too_deep"


@pytest.mark.parametrize("path, fields", [
    (C, b'"prompt": "\\ud800"'),
    (C, b'"prompt": "hi", "cache_salt": "tenant-\\udc00"'),  # once killed the engine loop (the salt's digest)
    (C, b'"prompt": "hi", "model": "\\ud800"'),  # once a 500: the 404's message could not be encoded
    (C, b'"prompt": "hi", "stop": ["\\udfff"]'),
    (CHAT_PATH, b'"messages": [{"role": "user", "content": "x\\ud800"}]'),
], ids=["prompt", "cache_salt", "model", "stop", "message"])
def test_lone_surrogates_get_400_and_leave_the_engine_running(served, path, fields):
    """JSON can spell half a UTF-16 pair (\\ud800); no tokenizer or digest takes it."""
    response = httpx.post(served.url + path, content=b"{" + fields + b', "max_tokens": 2}',
                          headers={"content-type": "application/json"})
    assert_openai_error(response, 400)
    assert response.json()["error"]["code"] == "invalid_unicode"
    assert served.async_engine.healthy


def test_surrogate_pairs_are_text(served):
    content = b'{"prompt": "I \\ud83d\\ude00 it", "max_tokens": 1}'  # an emoji, escaped as JSON spells it
    response = httpx.post(served.url + C, content=content, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == len(served.engine.tokenizer.encode("I \U0001F600 it"))


def test_unexpected_exception_gets_a_500_that_does_not_echo_it(caplog):
    """The client gets an error id, not the exception's text (paths, prompts, keys); the log gets the
    traceback under the same id."""
    def encode(text):
        raise RuntimeError("secret detail: /home/alice/.api_key")

    fake = FakeEngine()
    fake.tokenizer = SimpleNamespace(encode=encode)
    engine = AsyncLLMEngine(fake).start()
    try:
        with caplog.at_level(logging.ERROR, logger="jaxinfer"), live_server(create_app(engine)) as url:
            response = httpx.post(url + C, json={"prompt": "a string prompt is tokenized", "max_tokens": 2})
    finally:
        engine.shutdown(timeout=1)
    assert_openai_error(response, 500)
    assert "secret" not in response.text and "RuntimeError" not in response.text
    error_id = re.fullmatch(r"internal server error \(error id (\w+), in the server's log\)",
                            response.json()["error"]["message"]).group(1)
    logged = [r for r in caplog.records if error_id in r.getMessage()]
    assert len(logged) == 1 and "secret detail" in str(logged[0].exc_info[1])


def test_unknown_model_gets_404(served):
    response = httpx.post(served.url + C, json={"model": "gpt-5", "prompt": PROMPT})
    assert_openai_error(response, 404, "model")


def test_unknown_route_and_wrong_method_get_openai_shaped_errors(served):
    assert_openai_error(httpx.get(f"{served.url}/v1/nothing"), 404)
    assert_openai_error(httpx.get(served.url + C), 405)


def test_cache_salt_reaches_the_prefix_cache(served):
    """vLLM's cache_salt through the official client: the same prompt hits the prefix cache under its own
    salt only."""
    allocator = served.async_engine.engine.allocator
    prompt = "The quick brown fox jumps over the lazy dog. " * 12  # ~120 tokens: several full pages

    def hits_after(salt):
        before = allocator.prefix_cache_hits
        served.client.completions.create(model=NAME, prompt=prompt, max_tokens=1, extra_body={"cache_salt": salt})
        return allocator.prefix_cache_hits - before

    hits_after("tenant-a")
    assert hits_after("tenant-b") == 0
    assert hits_after("tenant-a") >= 64


def test_bad_requests_leave_the_engine_running(served):
    httpx.post(served.url + C, json={"prompt": [1] * 600})
    assert served.async_engine.healthy
    assert served.client.completions.create(model=NAME, prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2


def test_full_queue_gets_503_with_retry_after(served):
    served.async_engine.max_waiting = 0
    try:
        response = httpx.post(served.url + C, json={"prompt": PROMPT, "max_tokens": 2})
    finally:
        served.async_engine.max_waiting = 256
    assert_openai_error(response, 503)
    assert int(response.headers["retry-after"]) >= 1


def test_api_key_is_required_on_v1_but_not_on_health(served):
    app = create_app(served.async_engine, served_model_name=NAME, api_key="sesame")
    with live_server(app) as url:
        assert_openai_error(httpx.get(f"{url}/v1/models"), 401)
        assert_openai_error(httpx.post(url + C, json={"prompt": PROMPT},
                                       headers={"Authorization": "Bearer wrong"}), 401)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0)
        assert [m.id for m in client.models.list()] == [NAME]
        assert httpx.get(f"{url}/health").status_code == 200


def test_oversized_body_gets_413(served):
    app = create_app(served.async_engine, served_model_name=NAME, max_body_bytes=1024)
    with live_server(app) as url:
        assert_openai_error(httpx.post(url + C, json={"prompt": "x" * 2000}), 413)
        chunked = httpx.post(url + C, content=iter([b'{"prompt": "', b"x" * 2000, b'"}']))
        assert_openai_error(chunked, 413)


# -- disconnects, failures ----------------------------------------------------------------

def test_client_disconnect_mid_stream_aborts_the_request_and_frees_its_pages(served):
    assert idle(served)
    with httpx.Client(base_url=served.url) as client:
        body = {"prompt": PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
        with client.stream("POST", C, json=body) as response:
            data = [line for _, line in zip(range(6), response.iter_lines()) if line.startswith("data:")]
            assert len(data) == 3 and served.engine.allocator.num_free_pages < served.engine.allocator.num_pages
    started = time.monotonic()
    assert idle(served)  # 400 tokens would take far longer than the wait
    assert time.monotonic() - started < 5


def test_client_disconnect_while_waiting_for_a_whole_answer_aborts_it(served):
    assert idle(served)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(served.url + C, json={"prompt": PROMPT, "max_tokens": 400, "ignore_eos": True}, timeout=1.0)
    assert idle(served)


def test_engine_failure_fails_the_request_and_health_reports_it():
    fake = FakeEngine()
    engine = AsyncLLMEngine(fake).start()
    with live_server(create_app(engine, served_model_name="fake")) as url:
        fake.fail_next_step = True
        assert_openai_error(httpx.post(url + C, json={"prompt": [1, 2, 3], "max_tokens": 5}), 503)
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and "the device fell over" in health.json()["error"]
    assert not engine.healthy
