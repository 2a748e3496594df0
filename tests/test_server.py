"""The OpenAI-compatible server, through the official `openai` client (and httpx for malformed
requests) against a real uvicorn server on 127.0.0.1: conftest.py's `served`, one engine shared by
the API tests.

The reference for generated text is the engine itself run offline (add_request / step) on the same
prompts before the server takes it over: greedy output through HTTP must be the same tokens.
"""

import json
import logging
import re
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
from fake_engine import FakeEngine
from helpers import CHAT, MAX_TOKENS, NAME, PROMPT, idle, live_server

from jaxinfer.api import create_app
from jaxinfer.api.routes.app import MAX_JSON_DEPTH
from jaxinfer.async_engine import AsyncLLMEngine


# -- completions and chat ------------------------------------------------------------------------

def test_completion_greedy_text_and_usage_match_the_offline_engine(served):
    ref = served.reference.completion.outputs[0]
    response = served.client.completions.create(model=NAME, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert response.object == "text_completion" and response.model == NAME
    assert response.choices[0].text == ref.text
    assert response.choices[0].finish_reason == ref.finish_reason
    assert response.usage.prompt_tokens == len(served.engine.tokenizer.encode(PROMPT))
    assert response.usage.completion_tokens == len(ref.token_ids)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_completion_stream_deltas_concatenate_to_the_offline_text(served):
    ref = served.reference.completion.outputs[0]
    chunks = list(served.client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert not chunks[-1].choices
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)
    assert chunks[-1].usage.prompt_tokens == len(served.engine.tokenizer.encode(PROMPT))


def test_chat_greedy_text_and_usage_match_the_offline_engine(served):
    ref = served.reference.chat.outputs[0]
    response = served.client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=MAX_TOKENS,
                                                     temperature=0)
    assert response.object == "chat.completion"
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == ref.text
    assert response.usage.prompt_tokens == len(served.engine.tokenizer.encode_chat(CHAT))
    assert response.usage.completion_tokens == len(ref.token_ids)


def test_chat_stream_starts_with_the_role_and_concatenates_to_the_offline_text(served):
    ref = served.reference.chat.outputs[0]
    chunks = list(served.client.chat.completions.create(
        model=NAME, messages=CHAT, max_completion_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)


def test_n_2_gives_two_choices_reproducible_with_a_seed(served):
    def ask():
        return served.client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=6, n=2,
                                                     temperature=1.0, seed=1234)

    first, second = ask(), ask()
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    assert first.usage.completion_tokens == 12  # 2 x max_tokens; this prompt does not stop in 6 tokens


def test_stop_string_cuts_the_text_before_it(served):
    ref = served.reference.completion.outputs[0].text
    stop = ref.split()[1]  # the second word of the greedy continuation
    response = served.client.completions.create(model=NAME, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                                stop=[stop])
    assert response.choices[0].text == ref[:ref.index(stop)]
    assert response.choices[0].finish_reason == "stop"


def test_vllm_extras_reach_the_sampler(served):
    """top_k=1 samples the most likely token whatever the temperature: the greedy text."""
    response = served.client.completions.create(model=NAME, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=1.0,
                                                extra_body={"top_k": 1, "min_p": 0.0, "ignore_eos": True})
    assert response.choices[0].text == served.reference.completion.outputs[0].text


def test_token_id_prompts_and_several_prompts_in_one_request(served):
    ref = served.reference.completion.outputs[0]
    ids = served.engine.tokenizer.encode(PROMPT)
    response = served.client.completions.create(model=NAME, prompt=[ids, ids], max_tokens=MAX_TOKENS, temperature=0)
    assert [c.index for c in response.choices] == [0, 1]
    assert [c.text for c in response.choices] == [ref.text, ref.text]
    assert response.usage.prompt_tokens == 2 * len(ids)


def test_concurrent_requests_get_the_text_each_gets_alone(served):
    """The default configuration is batch-invariant through the server: 8 different greedy requests
    (some long enough to prefill in chunks beside the others' decode steps), sent together from 8
    threads, get exactly the text each gets when sent on its own."""
    import pydoc_data.topics
    from concurrent.futures import ThreadPoolExecutor

    topics = pydoc_data.topics.topics
    prompts = [topics[name][:length] for name, length in zip(sorted(topics)[10:18], [20, 900, 60, 400, 1500, 5, 250, 700])]

    def complete(prompt):
        return served.client.completions.create(model=NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                                extra_body={"ignore_eos": True}).choices[0].text

    alone = [complete(p) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(complete, prompts))
    assert together == alone
    assert idle(served)


def test_concurrent_streams_each_get_their_own_text(served):
    """Requests batched together: every stream carries its own request's tokens."""
    from concurrent.futures import ThreadPoolExecutor

    def stream(kind):
        if kind == "chat":
            chunks = served.client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=MAX_TOKENS,
                                                           temperature=0, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        chunks = served.client.completions.create(model=NAME, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                                  temperature=0, stream=True)
        return "".join(c.choices[0].text for c in chunks if c.choices)

    kinds = ["chat", "completion"] * 3
    with ThreadPoolExecutor(len(kinds)) as pool:
        texts = list(pool.map(stream, kinds))
    expected = {"chat": served.reference.chat.outputs[0].text, "completion": served.reference.completion.outputs[0].text}
    assert texts == [expected[k] for k in kinds]


def test_chat_logprobs_give_each_token_and_its_top_alternatives(served):
    response = served.client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=4, temperature=0,
                                                     logprobs=True, top_logprobs=3)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens == 4
    assert "".join(t.token for t in content) == response.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely token
        assert entry.logprob <= 0 and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)


def test_completion_logprobs_are_parallel_lists(served):
    response = served.client.completions.create(model=NAME, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert "".join(logprobs.tokens) == response.choices[0].text
    assert all(len(top) == 2 for top in logprobs.top_logprobs)


# -- models, health, metrics ---------------------------------------------------------------------

def test_models_lists_the_served_name(served):
    assert [m.id for m in served.client.models.list()] == [NAME]


def test_health_is_ok_while_the_engine_runs(served):
    response = httpx.get(f"{served.url}/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def parse_metrics(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name.split("{")[0] if "_bucket" not in name else name] = float(value)
    return values


def test_metrics_expose_vllm_named_series_with_sane_values(served):
    served.client.completions.create(model=NAME, prompt=PROMPT, max_tokens=4, temperature=0)
    assert idle(served)
    metrics = parse_metrics(httpx.get(f"{served.url}/metrics").text)
    for name in ("time_to_first_token_seconds_count", "inter_token_latency_seconds_count",
                 "e2e_request_latency_seconds_count", "prompt_tokens_total", "generation_tokens_total"):
        assert metrics[f"jaxinfer:{name}"] > 0, name
    assert metrics["jaxinfer:inter_token_latency_seconds_count"] >= 3  # 3 gaps between 4 tokens, at least
    assert metrics["jaxinfer:e2e_request_latency_seconds_sum"] >= metrics["jaxinfer:time_to_first_token_seconds_sum"]
    assert metrics["jaxinfer:num_requests_running"] == 0
    assert metrics["jaxinfer:num_requests_waiting"] == 0
    assert metrics["jaxinfer:kv_cache_usage_perc"] == 0
    assert metrics["jaxinfer:prefix_cache_hits_total"] <= metrics["jaxinfer:prefix_cache_queries_total"]
    assert metrics["jaxinfer:num_preemptions_total"] >= 0
    assert metrics["jaxinfer:compilations_total"] >= 0
    assert "jaxinfer:cost_per_million_tokens_dollars" not in metrics  # no --price-per-hour


def test_cost_per_million_tokens_is_the_price_over_measured_throughput():
    from jaxinfer.api.metrics import ServerMetrics

    metrics = ServerMetrics(AsyncLLMEngine(FakeEngine()), "fake", price_per_hour=3.6, window_s=60)
    metrics._started -= 60  # a full window has passed
    metrics.tokens(600, None)  # 600 tokens a minute = 36,000 an hour
    assert metrics.cost_per_million_tokens() == pytest.approx(3.6 * 1e6 / 36_000)
    assert "jaxinfer:cost_per_million_tokens_dollars" in metrics.render().decode()


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
    (C, {"prompt": PROMPT, "echo": True}, "echo"),
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
    (CHAT_PATH, {"messages": CHAT, "tools": [{"type": "function"}]}, "tools"),
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


def test_sse_lines_are_openai_chunks(served):
    """The raw stream: `data: {json}` events separated by blank lines, ending in `data: [DONE]`."""
    body = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", served.url + C, json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    events = text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ")
        assert json.loads(event[len("data: "):])["object"] == "text_completion"
