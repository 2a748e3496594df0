"""Tool calling on /v1/chat/completions: OpenAI's `tools` and `tool_choice` with Qwen2.5-Coder-0.5B-
Instruct (its chat template writes Hermes `<tool_call>`s), through the official `openai` client.

References: the tool's JSON schema (jsonschema validates every call's arguments), the model's own
chat template rendered by HF transformers (prompts with tools and tool results), the raw completion
of the same prompt (what `auto` parses is what the model wrote), and texts built here with json.dumps
(the parser, fed in random pieces).
"""

import json
import random

import httpx
import jsonschema
import openai
import pytest
from helpers import idle

from jaxinfer.api.assistant import AssistantParser, OutputFormat
from jaxinfer.api.hermes import HermesParser

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "The city's name."},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a time zone.",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}}}
# A schema with a $ref (pydantic writes them): the constraint moves $defs so the ref still resolves.
BOOK = {"type": "function", "function": {
    "name": "book_flight", "description": "Books a flight.",
    "parameters": {"$defs": {"Airport": {"type": "string", "enum": ["CDG", "JFK", "NRT"]}},
                   "type": "object", "properties": {"origin": {"$ref": "#/$defs/Airport"},
                                                    "destination": {"$ref": "#/$defs/Airport"},
                                                    "passengers": {"type": "integer", "minimum": 1, "maximum": 9}},
                   "required": ["origin", "destination", "passengers"]}}}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def schema_of(name: str) -> dict:
    return next(t for t in (WEATHER, TIME, BOOK) if t["function"]["name"] == name)["function"]["parameters"]


def streamed(client, **request):
    """The content, tool calls ({index: [id, name, arguments]}) and finish reason of a streamed answer,
    put together from its chunks as OpenAI's streaming format says."""
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **request):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, [None, None, ""])
                if delta.id:
                    assert call[0] is None, "a call's id comes once"
                    call[0] = delta.id
                if delta.function and delta.function.name:
                    assert call[1] is None, "a call's name comes once"
                    call[1] = delta.function.name
                call[2] += (delta.function.arguments or "") if delta.function else ""
            finish = choice.finish_reason or finish
    return content, calls, finish


def test_required_tool_choice_gives_calls_whose_arguments_follow_the_schema(served_qwen):
    answer = served_qwen.client.chat.completions.create(
        model="qwen", messages=ASK, tools=[WEATHER, TIME], tool_choice="required", temperature=0, max_tokens=120)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), schema_of(call.function.name))
    assert choice.message.tool_calls[0].function.name == "get_weather"


@pytest.mark.parametrize("tool", [TIME, BOOK], ids=["get_time", "book_flight_with_refs"])
def test_a_named_function_is_the_one_call_made(served_qwen, tool):
    name = tool["function"]["name"]
    answer = served_qwen.client.chat.completions.create(
        model="qwen", messages=ASK, tools=[WEATHER, TIME, BOOK], temperature=1.0, seed=3, max_tokens=120,
        tool_choice={"type": "function", "function": {"name": name}})
    calls = answer.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == [name]
    jsonschema.validate(json.loads(calls[0].function.arguments), schema_of(name))


def test_sampled_required_calls_are_always_valid(served_qwen):
    answer = served_qwen.client.chat.completions.create(
        model="qwen", messages=ASK, tools=[WEATHER, BOOK], tool_choice="required", temperature=1.0, n=6, seed=11,
        max_tokens=150)
    for choice in answer.choices:
        assert choice.finish_reason == "tool_calls", choice
        for call in choice.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), schema_of(call.function.name))


@pytest.mark.parametrize("tool_choice", ["required", "auto"])
def test_streamed_tool_calls_equal_the_whole_answer(served_qwen, tool_choice):
    request = dict(model="qwen", messages=ASK, tools=[WEATHER, TIME], tool_choice=tool_choice, temperature=0,
                   max_tokens=120)
    whole = served_qwen.client.chat.completions.create(**request).choices[0]
    content, calls, finish = streamed(served_qwen.client, **request)
    assert finish == whole.finish_reason == "tool_calls"
    assert content == ""
    assert [(name, args) for _, name, args in calls.values()] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert all(call_id.startswith("call_") for call_id, _, _ in calls.values())


def test_parallel_tool_calls_false_allows_one_call(served_qwen):
    answer = served_qwen.client.chat.completions.create(
        model="qwen", messages=[{"role": "user", "content": "Weather in Paris and in Tokyo?"}], tools=[WEATHER],
        tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=150)
    assert len(answer.choices[0].message.tool_calls) == 1


def test_auto_parses_what_the_model_wrote(served_qwen, qwen_hf_tokenizer):
    """tool_choice auto constrains nothing: the answer is the raw completion of the same prompt (the
    template rendered by transformers), its <tool_call> blocks returned as calls."""
    answer = served_qwen.client.chat.completions.create(model="qwen", messages=ASK, tools=[WEATHER], temperature=0,
                                                        max_tokens=80)
    prompt = qwen_hf_tokenizer.apply_chat_template(ASK, tools=[WEATHER], add_generation_prompt=True, tokenize=False)
    raw = served_qwen.client.completions.create(model="qwen", prompt=prompt, temperature=0, max_tokens=80,
                                                extra_body={"skip_special_tokens": False}).choices[0].text
    raw = raw.removesuffix("<|im_end|>")
    blocks = [json.loads(b.split("</tool_call>")[0]) for b in raw.split("<tool_call>")[1:]]
    content = raw.split("<tool_call>")[0].strip()
    if not blocks and content.startswith("{"):  # this model writes its one call as bare JSON
        blocks, content = [json.loads(content)], ""
    assert blocks, "the model calls the tool for this prompt"
    message = answer.choices[0].message
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []] == \
        [(b["name"], b["arguments"]) for b in blocks]
    assert (message.content or "") == content
    assert answer.choices[0].finish_reason == ("tool_calls" if blocks else "stop")


def test_a_tool_result_round_trip_renders_as_the_template_says(served_qwen, qwen_hf_tokenizer):
    first = served_qwen.client.chat.completions.create(model="qwen", messages=ASK, tools=[WEATHER],
                                                       tool_choice="required", temperature=0, max_tokens=80)
    call = first.choices[0].message.tool_calls[0]
    messages = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "sky": "cloudy"})}]
    answer = served_qwen.client.chat.completions.create(model="qwen", messages=messages, tools=[WEATHER],
                                                        temperature=0, max_tokens=40)
    # transformers renders the arguments as an object, as the template wants them.
    hf_messages = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": call.function.name,
                                          "arguments": json.loads(call.function.arguments)}}]}, messages[-1]]
    expected = qwen_hf_tokenizer.apply_chat_template(hf_messages, tools=[WEATHER], add_generation_prompt=True,
                                                     tokenize=True, return_dict=False)
    assert answer.usage.prompt_tokens == len(expected)
    assert answer.choices[0].message.content
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_tool_choice_none_renders_no_tools(served_qwen, qwen_hf_tokenizer):
    answer = served_qwen.client.chat.completions.create(model="qwen", messages=ASK, tools=[WEATHER],
                                                        tool_choice="none", temperature=0, max_tokens=8)
    expected = qwen_hf_tokenizer.apply_chat_template(ASK, add_generation_prompt=True, tokenize=True,
                                                     return_dict=False)
    assert answer.usage.prompt_tokens == len(expected)
    assert answer.choices[0].message.tool_calls is None


@pytest.mark.parametrize("request_fields, param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1]"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
])
def test_bad_tool_requests_are_400s_naming_the_field(served_qwen, request_fields, param):
    with pytest.raises(openai.BadRequestError) as error:
        served_qwen.client.chat.completions.create(model="qwen", messages=ASK, max_tokens=4,
                                                   **request_fields)
    assert error.value.body["param"] == param
    assert idle(served_qwen)


def test_tools_on_a_model_whose_template_has_none_are_refused(served):
    with pytest.raises(openai.BadRequestError, match="does not support tool calls"):
        served.client.chat.completions.create(model="smol", messages=ASK, tools=[WEATHER], max_tokens=4)


@pytest.mark.parametrize("call", [
    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{city: Paris"}},
    {"id": ["call_1"], "type": "function", "function": {"name": "get_weather", "arguments": "{}"}},
    {"id": "call_1", "type": "retrieval", "function": {"name": "get_weather", "arguments": "{}"}},
], ids=["arguments not JSON", "id not a string", "type not function"])
def test_a_malformed_assistant_tool_call_is_a_400(served_qwen, call):
    messages = [*ASK, {"role": "assistant", "tool_calls": [call]}]
    with pytest.raises(openai.BadRequestError) as error:
        served_qwen.client.chat.completions.create(model="qwen", messages=messages, tools=[WEATHER], max_tokens=4)
    assert error.value.body["param"] == "messages[1].tool_calls[0]"
    response = httpx.post(f"{served_qwen.url}/tokenize", json={"messages": messages})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages[1].tool_calls[0]"


# -- the parser, on texts built here ----------------------------------------------------------------

def hermes(name: str, arguments: dict) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


TEXTS = [
    ("", [("get_weather", {"city": "Pa\"ris}", "unit": "celsius"})]),
    ("Let me look.", [("get_weather", {"city": "Oslo", "unit": "celsius"}), ("get_time", {"timezone": "<tool_call>"})]),
    ("no call here, just a < sign and </tool_call", []),
    ('{"name" is how JSON names a key', []),
]


@pytest.mark.parametrize("prefix, calls", TEXTS)
def test_the_parser_finds_the_calls_whole_and_in_any_pieces(prefix, calls):
    text = "\n".join([prefix, *(hermes(n, a) for n, a in calls)]) if calls else prefix
    for seed in range(30):
        rng = random.Random(seed)
        parser, content, arguments, names = HermesParser(), "", {}, {}
        pieces = [text] if seed == 0 else []
        i = 0
        while seed and i < len(text):
            n = rng.randint(1, 7)
            pieces.append(text[i:i + n])
            i += n
        for piece in pieces + [None]:
            more, deltas = parser.feed(piece) if piece is not None else parser.finish()
            content += more
            for d in deltas:
                arguments[d.index] = arguments.get(d.index, "") + d.arguments
                if d.name:
                    names[d.index] = d.name
        assert content == prefix
        assert [(names[i], json.loads(arguments[i])) for i in sorted(names)] == calls


@pytest.mark.parametrize("pieces", [['{"name": "get_weather", "arguments": {"city": "Rome"}}'],
                                    [' \n{"na', 'me"  :', ' "get_weather", "arguments": {"city": "Rome"}}', '\n']])
def test_an_answer_that_is_one_bare_json_call_is_a_call(pieces):
    parser = HermesParser()
    handed_out = "".join(parser.feed(p)[0] for p in pieces)
    assert handed_out == "" and parser.finish()[0] == ""
    assert [(c.name, json.loads(c.arguments)) for c in parser.calls] == [("get_weather", {"city": "Rome"})]


def test_a_call_the_model_did_not_close_is_a_call_if_its_json_is_whole():
    parser = AssistantParser(OutputFormat(tool_calls=True, think=None), parse_tool_calls=True)
    parser.feed('<tool_call>\n{"arguments": {"city": "Rome"}, "name": "get_weather"}')
    parser.finish()
    assert [(c.name, json.loads(c.arguments)) for c in parser.tool_calls] == [("get_weather", {"city": "Rome"})]
    broken = AssistantParser(OutputFormat(tool_calls=True, think=None), parse_tool_calls=True)
    broken.feed("<tool_call>\nnot json</tool_call> and after")
    broken.finish()
    assert broken.tool_calls == [] and broken.content == "<tool_call>\nnot json</tool_call> and after"
