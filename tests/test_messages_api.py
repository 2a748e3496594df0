"""Anthropic's Messages API (POST /v1/messages) through the official `anthropic` client against the live
servers of conftest.py: `served` (SmolLM2) for text, `served_qwen` (Qwen2.5-Coder, Hermes tool calls)
for tools.

The references: for text, the engine's own greedy output on the same rendered prompt (`served.reference`,
taken offline, and /v1/chat/completions, the same engine and template); for prompts, the tokenizer's
count of the chat template's rendering; for tool inputs, the tool's own JSON schema (jsonschema).
"""

import json

import anthropic
import httpx
import jsonschema
import pytest
from helpers import CHAT, MAX_TOKENS, NAME, idle, live_server

from jaxinfer.api import anthropic as anthropic_api
from jaxinfer.api import create_app
from jaxinfer.api.errors import APIError

QUESTION = CHAT[0]["content"]
WEATHER = {"name": "get_weather", "description": "The current weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"},
                                                             "unit": {"enum": ["celsius", "fahrenheit"]}},
                            "required": ["city"]}}
# Newer `anthropic` clients (2.x) have no temperature argument; the server reads it when sent.
GREEDY = {"extra_body": {"temperature": 0}}
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(served):
    return anthropic.Anthropic(base_url=served.url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def qwen(served_qwen):
    return anthropic.Anthropic(base_url=served_qwen.url, api_key="unused", max_retries=0)


def text_of(message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def streamed_events(client, **kwargs) -> list:
    return list(client.messages.create(stream=True, **kwargs))


# -- text ---------------------------------------------------------------------------------------

def test_greedy_text_and_usage_match_the_offline_engine(served, client):
    ref = served.reference.chat.outputs[0]
    message = client.messages.create(model=NAME, max_tokens=MAX_TOKENS, messages=CHAT, **GREEDY)
    assert message.type == "message" and message.role == "assistant" and message.model == NAME
    assert message.id.startswith("msg_")
    assert text_of(message) == ref.text
    assert [block.type for block in message.content] == ["text"]
    assert message.usage.input_tokens == len(served.engine.tokenizer.encode_chat(CHAT))
    assert message.usage.output_tokens == len(ref.token_ids)
    assert (ref.finish_reason, message.stop_reason, message.stop_sequence) == ("length", "max_tokens", None)


def raw_events(served, body: dict) -> list[tuple[str, dict]]:
    """(event name, data) of a streamed answer, read off the wire (the SDK does not hand out pings)."""
    with httpx.stream("POST", f"{served.url}/v1/messages", json={**body, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    events = []
    for raw in text.strip().split("\n\n"):
        name, data = raw.split("\n")
        events.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return events


def test_stream_is_anthropics_event_sequence_and_concatenates_to_the_whole_text(served, client):
    whole = client.messages.create(model=NAME, max_tokens=MAX_TOKENS, messages=CHAT, **GREEDY)
    events = raw_events(served, {"model": NAME, "max_tokens": MAX_TOKENS, "messages": CHAT, "temperature": 0})
    assert all(name == data["type"] for name, data in events)
    kinds = [name for name, _ in events]
    assert kinds[:3] == ["message_start", "ping", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[3:-3]) == {"content_block_delta"}
    data = [d for _, d in events]
    assert data[0]["message"]["usage"]["input_tokens"] == whole.usage.input_tokens
    assert data[2]["content_block"] == {"type": "text", "text": ""}
    assert "".join(d["delta"]["text"] for d in data[3:-3]) == text_of(whole)
    assert data[-2]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert data[-2]["usage"]["output_tokens"] == whole.usage.output_tokens
    assert idle(served)


def test_the_sdks_stream_helper_assembles_the_same_message(client):
    whole = client.messages.create(model=NAME, max_tokens=MAX_TOKENS, messages=CHAT, **GREEDY)
    with client.messages.stream(model=NAME, max_tokens=MAX_TOKENS, messages=CHAT, **GREEDY) as stream:
        final = stream.get_final_message()
    assert [(b.type, b.text) for b in final.content] == [(b.type, b.text) for b in whole.content]
    assert (final.stop_reason, final.usage.output_tokens) == (whole.stop_reason, whole.usage.output_tokens)


def test_an_answer_that_ends_by_itself_is_end_turn_as_chat_completions_says_stop(served, client):
    messages = [{"role": "user", "content": "Say just the word yes."}]
    chat = served.client.chat.completions.create(model=NAME, messages=messages, max_tokens=64, temperature=0)
    assert chat.choices[0].finish_reason == "stop"  # the reference: this prompt ends within 64 tokens
    message = client.messages.create(model=NAME, max_tokens=64, messages=messages, **GREEDY)
    assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)
    assert text_of(message) == chat.choices[0].message.content
    assert message.usage.output_tokens == chat.usage.completion_tokens


def test_a_stop_sequence_cuts_the_text_and_is_named(served, client):
    ref = served.reference.chat.outputs[0].text
    stop = ref.split()[1]  # the greedy answer's second word
    message = client.messages.create(model=NAME, max_tokens=MAX_TOKENS, messages=CHAT, **GREEDY,
                                     stop_sequences=["no such text", stop])
    assert text_of(message) == ref[:ref.index(stop)]
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", stop)
    events = streamed_events(client, model=NAME, max_tokens=MAX_TOKENS, messages=CHAT, **GREEDY,
                             stop_sequences=[stop])
    assert (events[-2].delta.stop_reason, events[-2].delta.stop_sequence) == ("stop_sequence", stop)


def test_the_system_prompt_is_rendered_by_the_chat_template(served, client):
    system = "You are a pirate. Answer like one."
    rendered = [{"role": "system", "content": system}, *CHAT]
    chat = served.client.chat.completions.create(model=NAME, messages=rendered, max_tokens=8, temperature=0)
    for given in (system, [{"type": "text", "text": system}]):
        message = client.messages.create(model=NAME, max_tokens=8, system=given, messages=CHAT, **GREEDY)
        assert message.usage.input_tokens == len(served.engine.tokenizer.encode_chat(rendered))
        assert text_of(message) == chat.choices[0].message.content


def test_a_final_assistant_message_is_continued(served, client):
    prefill = "The capital of France is"
    message = client.messages.create(model=NAME, max_tokens=4, **GREEDY,
                                     messages=[*CHAT, {"role": "assistant", "content": prefill}])
    prompt = served.engine.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True) + prefill
    completion = served.client.completions.create(model=NAME, prompt=prompt, max_tokens=4, temperature=0)
    assert text_of(message) == completion.choices[0].text
    assert message.usage.input_tokens == completion.usage.prompt_tokens


def test_a_client_that_leaves_mid_stream_frees_its_pages(served, client):
    with client.messages.create(model=NAME, max_tokens=200, messages=CHAT, stream=True) as stream:
        for e in stream:
            if e.type == "content_block_delta":
                break
    assert idle(served)


def test_output_config_format_makes_the_text_json_that_follows_the_schema(client):
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 12}},
              "required": ["capital"], "additionalProperties": False}
    message = client.messages.create(model=NAME, max_tokens=40, messages=CHAT, **GREEDY,
                                     output_config={"format": {"type": "json_schema", "schema": schema}})
    jsonschema.validate(json.loads(text_of(message)), schema)
    assert message.stop_reason == "end_turn"  # the grammar ended the answer


# -- errors -------------------------------------------------------------------------------------

def anthropic_error(body, error_type: str) -> str:
    assert body["type"] == "error" and body["error"]["type"] == error_type
    return body["error"]["message"]


@pytest.mark.parametrize("error, status, error_type", [
    (APIError(400, "bad"), 400, "invalid_request_error"), (APIError(401, "key"), 401, "authentication_error"),
    (APIError(404, "model"), 404, "not_found_error"), (APIError(413, "big"), 413, "request_too_large"),
    (APIError(503, "busy", code="overloaded"), 529, "overloaded_error"),
    (APIError(503, "dead", code="engine_dead"), 503, "api_error"),
])
def test_errors_take_anthropics_types_and_statuses(error, status, error_type):
    # The reference: https://docs.anthropic.com/en/api/errors (529 is Anthropic's "overloaded").
    assert anthropic_api.error_of(error) == (status, {"type": "error", "error": {"type": error_type,
                                                                                 "message": error.message}})


def test_missing_max_tokens_is_anthropics_invalid_request_error(served):
    response = httpx.post(f"{served.url}/v1/messages", json={"model": NAME, "messages": CHAT})
    assert response.status_code == 400
    assert "max_tokens" in anthropic_error(response.json(), "invalid_request_error")


@pytest.mark.parametrize("messages, field", [
    ([{"role": "system", "content": "hi"}], "role"),
    ([{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://x"}}]}], "image"),
    ([{"role": "user", "content": 5}], "content"),
    ([], "messages"),
    ([*CHAT, {"role": "assistant", "content": "Paris "}], "whitespace"),
    ([{"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "x", "content": "y"}]}], "tool_result"),
])
def test_a_bad_message_is_a_bad_request(client, messages, field):
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model=NAME, max_tokens=4, messages=messages)
    assert field in anthropic_error(e.value.body, "invalid_request_error")


@pytest.mark.parametrize("extra, field", [
    ({"extra_body": {"temperature": 1.5}}, "temperature"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
    ({"tool_choice": {"type": "any"}}, "tool_choice"),
])
def test_a_bad_or_unimplemented_field_is_a_bad_request(client, extra, field):
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model=NAME, max_tokens=4, messages=CHAT, **extra)
    assert field in anthropic_error(e.value.body, "invalid_request_error")


def test_an_unknown_model_is_not_found(client):
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="claude-opus", max_tokens=4, messages=CHAT)
    assert "claude-opus" in anthropic_error(e.value.body, "not_found_error")


def test_tools_on_a_model_whose_template_has_none_are_refused(client):
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model=NAME, max_tokens=4, messages=WEATHER_QUESTION, tools=[WEATHER])
    assert "chat template does not support tool calls" in anthropic_error(e.value.body, "invalid_request_error")


def test_the_api_key_is_taken_from_x_api_key_or_bearer(served):
    app = create_app(served.async_engine, served_model_name=NAME, api_key="sesame")
    with live_server(app) as url:
        with pytest.raises(anthropic.AuthenticationError) as e:
            anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0).messages.create(
                model=NAME, max_tokens=1, messages=CHAT)
        anthropic_error(e.value.body, "authentication_error")
        message = anthropic.Anthropic(base_url=url, api_key="sesame", max_retries=0).messages.create(
            model=NAME, max_tokens=1, messages=CHAT)
        assert message.usage.output_tokens == 1
        bearer = httpx.post(f"{url}/v1/messages", headers={"Authorization": "Bearer sesame"},
                            json={"model": NAME, "max_tokens": 1, "messages": CHAT})
        assert bearer.status_code == 200
    assert idle(served)


# -- tools (Qwen2.5-Coder: its template writes Hermes tool calls) --------------------------------

def test_a_named_tool_choice_gives_a_tool_use_that_follows_the_schema(qwen):
    message = qwen.messages.create(model="qwen", max_tokens=64, messages=WEATHER_QUESTION, tools=[WEATHER],
                                   tool_choice={"type": "tool", "name": "get_weather"}, **GREEDY)
    assert message.stop_reason == "tool_use"
    [call] = [block for block in message.content if block.type == "tool_use"]
    assert call.name == "get_weather" and call.id.startswith("toolu_")
    jsonschema.validate(call.input, WEATHER["input_schema"])


def test_streamed_input_json_deltas_parse_to_the_whole_messages_input(qwen):
    kwargs = dict(model="qwen", max_tokens=64, messages=WEATHER_QUESTION, tools=[WEATHER],
                  tool_choice={"type": "tool", "name": "get_weather"}, **GREEDY)
    whole = qwen.messages.create(**kwargs)
    events = streamed_events(qwen, **kwargs)
    starts = [e.content_block for e in events if e.type == "content_block_start"]
    assert [(b.type, b.name) for b in starts if b.type == "tool_use"] == [("tool_use", "get_weather")]
    partial = "".join(e.delta.partial_json for e in events
                      if e.type == "content_block_delta" and e.delta.type == "input_json_delta")
    [call] = [block for block in whole.content if block.type == "tool_use"]
    assert json.loads(partial) == call.input
    assert events[-2].delta.stop_reason == "tool_use"
    with qwen.messages.stream(**kwargs) as stream:  # the SDK's own assembly of the deltas
        final = stream.get_final_message()
    assert [(b.type, b.name, b.input) for b in final.content] == [("tool_use", "get_weather", call.input)]


def test_tool_choice_any_calls_one_of_the_tools(qwen):
    clock = {"name": "get_time", "description": "The time in a city.",
             "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    message = qwen.messages.create(model="qwen", max_tokens=64, messages=WEATHER_QUESTION, tools=[WEATHER, clock],
                                   tool_choice={"type": "any"}, **GREEDY)
    calls = [block for block in message.content if block.type == "tool_use"]
    # `any` lets the model call several tools (the grammar repeats calls): it may run into max_tokens
    # in the middle of one, which is then cut short (a call's input, or the text of a call whose
    # name had not arrived).
    assert message.stop_reason in ("tool_use", "max_tokens")
    text = text_of(message)
    if message.stop_reason == "tool_use":
        assert not text
    elif text:  # cut before the last call's name: that call is text
        assert text.startswith("<tool_call>")
    else:  # cut in the last call's input
        calls = calls[:-1]
    assert calls
    for call in calls:
        jsonschema.validate(call.input, {t["name"]: t for t in (WEATHER, clock)}[call.name]["input_schema"])


def test_tool_choice_none_renders_no_tools(served_qwen, qwen):
    message = qwen.messages.create(model="qwen", max_tokens=1, messages=WEATHER_QUESTION, tools=[WEATHER],
                                   tool_choice={"type": "none"}, **GREEDY)
    assert message.usage.input_tokens == len(served_qwen.engine.tokenizer.encode_chat(WEATHER_QUESTION))


def test_a_tool_result_round_trip_is_rendered_and_answered(served_qwen, qwen):
    call = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "22 C, sunny"}]}
    messages = [*WEATHER_QUESTION, {"role": "assistant", "content": [call]}, {"role": "user", "content": [result]}]
    message = qwen.messages.create(model="qwen", max_tokens=16, messages=messages, tools=[WEATHER], **GREEDY)
    assert message.stop_reason in ("end_turn", "max_tokens") and text_of(message)
    # The reference: the same conversation in the chat template's own terms.
    rendered = [*WEATHER_QUESTION,
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "toolu_1", "type": "function", "function": {"name": "get_weather",
                                                                       "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "tool_call_id": "toolu_1", "content": "22 C, sunny"}]
    tools = [{"type": "function", "function": {"name": WEATHER["name"], "description": WEATHER["description"],
                                               "parameters": WEATHER["input_schema"]}}]
    tokenizer = served_qwen.engine.tokenizer
    assert message.usage.input_tokens == len(tokenizer.encode_chat(rendered, tools=tools))
    assert "22 C, sunny" in tokenizer.apply_chat_template(rendered, tools=tools)


def test_stream_blocks_follow_the_answers_parts_in_order():
    # Anthropic's streaming order: a block per kind of text (thinking, text) and per tool call, each
    # opened, given its deltas and closed before the next opens; indexes count up from 0.
    from jaxinfer.api.assistant import AssistantDelta
    from jaxinfer.api.routes.messages import _Blocks
    from jaxinfer.api.hermes import ToolCallDelta

    blocks = _Blocks()
    deltas = [AssistantDelta(reasoning="hm"), AssistantDelta(reasoning=" ok", content="Hi"),
              AssistantDelta(tool_calls=[ToolCallDelta(0, "call_1", "f", "")]),
              AssistantDelta(tool_calls=[ToolCallDelta(0, arguments='{"a": 1}')])]
    events = [e for delta in deltas for e in blocks.add(delta)] + list(blocks.close())
    parsed = [json.loads(e.split("\n")[1].removeprefix("data: ")) for e in events]
    assert [(p["type"], p.get("index")) for p in parsed] == [
        ("content_block_start", 0), ("content_block_delta", 0), ("content_block_delta", 0),
        ("content_block_stop", 0), ("content_block_start", 1), ("content_block_delta", 1),
        ("content_block_stop", 1), ("content_block_start", 2), ("content_block_delta", 2), ("content_block_stop", 2)]
    assert parsed[0]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    assert [parsed[i]["delta"] for i in (1, 2, 5, 8)] == [
        {"type": "thinking_delta", "thinking": "hm"}, {"type": "thinking_delta", "thinking": " ok"},
        {"type": "text_delta", "text": "Hi"}, {"type": "input_json_delta", "partial_json": '{"a": 1}'}]
    assert parsed[7]["content_block"] == {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}
