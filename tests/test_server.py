"""The OpenAI-compatible server, through the official `openai` client (and httpx for the raw
SSE stream) against a real uvicorn server on 127.0.0.1: conftest.py's `served`, one engine shared by
the API tests.

The reference for generated text is the engine itself run offline (add_request / step) on the same
prompts before the server takes it over: greedy output through HTTP must be the same tokens.
"""

import functools
import json

import httpx
import openai
import pytest
from fake_engine import FakeEngine
from helpers import CHAT, MAX_TOKENS, NAME, PROMPT, idle

from jaxinfer.async_engine import AsyncLLMEngine

C = "/v1/completions"


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


def test_min_tokens_holds_off_eos_and_stop_strings(served):
    """vLLM's min_tokens: the greedy chat answer ends (EOS) after n tokens; asked for at least n + 6,
    the answer is the same n tokens, then goes on where EOS was forbidden, and a stop string in the
    first n tokens does not end it either."""
    question = [{"role": "user", "content": "What is 2 + 2? Answer with one number."}]
    ask = functools.partial(served.client.chat.completions.create, model=NAME, messages=question, temperature=0)
    plain = ask(max_tokens=64)
    text, n = plain.choices[0].message.content, plain.usage.completion_tokens
    assert plain.choices[0].finish_reason == "stop" and n < 40  # the precondition: it ends by EOS, early
    held = ask(max_tokens=64, extra_body={"min_tokens": n + 6, "stop": [text.split()[1]]})
    assert held.usage.completion_tokens >= n + 6
    assert held.choices[0].message.content.startswith(text)
    assert held.choices[0].finish_reason in ("stop", "length")
    exact = ask(max_tokens=n + 6, extra_body={"min_tokens": n + 6})
    assert exact.usage.completion_tokens == n + 6 and exact.choices[0].finish_reason == "length"
    # A grammar that allows nothing but its end still ends the answer (vLLM's grammar wins too).
    chosen = ask(max_tokens=20, extra_body={"min_tokens": 10, "structured_outputs": {"choice": ["four", "five"]}})
    assert chosen.choices[0].message.content in ("four", "five") and chosen.choices[0].finish_reason == "stop"
    for body, message in (({"min_tokens": 7, "max_tokens": 6}, "at most max_tokens"),
                          ({"min_tokens": -1}, ">= 0")):
        with pytest.raises(openai.BadRequestError) as error:
            ask(extra_body=body)
        assert message in error.value.body["message"] and error.value.body["param"] == "min_tokens"
    assert idle(served)


def test_logit_bias_bans_and_forces_tokens_and_leaves_the_logprobs(served):
    """-100 on the greedy first token: the answer starts with the plain answer's second choice, with
    the logprob the plain answer gave that alternative; +100 on a token: every token is it."""
    ask = functools.partial(served.client.completions.create, model=NAME, prompt=PROMPT, temperature=0)
    plain = ask(max_tokens=1, logprobs=2).choices[0].logprobs
    first, (second, second_logprob) = plain.tokens[0], list(plain.top_logprobs[0].items())[1]
    tokenizer = served.engine.tokenizer
    first_id = tokenizer.encode(first, add_special_tokens=False)[0]
    banned = ask(max_tokens=1, logprobs=2, logit_bias={str(first_id): -100}).choices[0].logprobs
    assert banned.tokens[0] == second
    assert banned.token_logprobs[0] == pytest.approx(second_logprob, abs=1e-4)
    forced_id = tokenizer.encode(" Paris", add_special_tokens=False)[0]
    forced = ask(max_tokens=4, temperature=1.0, seed=3, logit_bias={forced_id: 100})
    assert forced.choices[0].text == tokenizer.decode([forced_id] * 4)
    for bias, message in (({"12": 101}, "numbers in [-100, 100]"), ({"x": 1}, "token ids (as strings)"),
                          ({str(served.engine.model_config.vocab_size): 1}, "logit_bias token ids must be in")):
        with pytest.raises(openai.BadRequestError) as error:
            ask(max_tokens=1, logit_bias=bias)
        assert message in error.value.body["message"] and error.value.body["param"] == "logit_bias"
    assert idle(served)


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
