"""POST /v1/responses (OpenAI's Responses API, stateless) through the official `openai` client against
the live servers of conftest.py: `served` (SmolLM2, whose template writes no tool calls) and
`served_qwen` (Qwen2.5-Coder-0.5B-Instruct, Hermes tool calls).

The references: the engine's own greedy output taken offline (`served.reference`), the chat
completions route on the same messages (same engine, same template), the non-streamed response for
a stream, and JSON Schema (jsonschema) for constrained text and tool arguments.
"""

import json

import jsonschema
import openai
import pytest
from helpers import CHAT, MAX_TOKENS, NAME, idle

INSTRUCTIONS = "You are a geography teacher. Answer in one sentence."
QUESTION = CHAT[0]["content"]
TEXT_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added", "response.output_text.delta", "response.output_text.done",
               "response.content_part.done", "response.output_item.done"]


def greedy(client, **kwargs):
    return client.responses.create(model=kwargs.pop("model", NAME), temperature=0, **kwargs)


def collapse(types: list[str]) -> list[str]:
    """Runs of the same event type as one."""
    return [t for i, t in enumerate(types) if i == 0 or types[i - 1] != t]


# -- text ---------------------------------------------------------------------------------------

def test_string_input_is_one_user_message_answered_as_the_offline_engine_answers(served):
    ref = served.reference.chat.outputs[0]
    response = greedy(served.client, input=QUESTION, max_output_tokens=MAX_TOKENS)
    assert response.object == "response" and response.id.startswith("resp_") and response.model == NAME
    assert response.output_text == ref.text
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.content[0].type == "output_text" and message.content[0].annotations == []
    assert response.usage.input_tokens == len(served.engine.tokenizer.encode_chat(CHAT))
    assert response.usage.output_tokens == len(ref.token_ids)
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens


def test_instructions_and_message_items_answer_as_chat_completions_does(served):
    input_items = [{"role": "user", "content": [{"type": "input_text", "text": "Hello!"}]},
                   {"role": "assistant", "content": [{"type": "output_text", "text": "Hello! How can I help?"}]},
                   {"type": "message", "role": "user", "content": QUESTION}]
    messages = [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": "Hello!"},
                {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": QUESTION}]
    chat = served.client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0)
    response = greedy(served.client, instructions=INSTRUCTIONS, input=input_items, max_output_tokens=16)
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.instructions == INSTRUCTIONS


def test_developer_role_is_a_system_message(served):
    as_developer = greedy(served.client, input=[{"role": "developer", "content": INSTRUCTIONS},
                                                {"role": "user", "content": QUESTION}], max_output_tokens=8)
    as_instructions = greedy(served.client, instructions=INSTRUCTIONS, input=QUESTION, max_output_tokens=8)
    assert as_developer.output_text == as_instructions.output_text
    assert as_developer.usage.input_tokens == as_instructions.usage.input_tokens


def test_max_output_tokens_cut_makes_the_response_incomplete(served):
    response = greedy(served.client, input=QUESTION, max_output_tokens=3)
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 3
    assert response.output[-1].status == "incomplete"


def test_a_finished_answer_is_completed_and_stores_nothing(served):
    response = greedy(served.client, input="Say OK.", max_output_tokens=64, store=True, metadata={"k": "v"})
    assert response.status == "completed" and response.incomplete_details is None
    assert response.output[-1].status == "completed"
    assert response.model_extra["store"] is False
    assert response.metadata == {"k": "v"}
    assert response.temperature == 0 and response.tools == [] and response.tool_choice == "none"


def test_stream_events_come_in_order_and_deltas_concatenate_to_the_whole_text(served):
    whole = greedy(served.client, input=QUESTION, max_output_tokens=MAX_TOKENS)
    events = list(greedy(served.client, input=QUESTION, max_output_tokens=MAX_TOKENS, stream=True))
    types = [e.type for e in events]
    assert collapse(types) == TEXT_EVENTS + [f"response.{whole.status}"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert "".join(e.delta for e in deltas) == whole.output_text
    text_done = next(e for e in events if e.type == "response.output_text.done")
    assert text_done.text == whole.output_text
    item_id = events[2].item.id
    assert all(e.item_id == item_id and e.output_index == 0 for e in deltas)
    last = events[-1].response
    assert last.output_text == whole.output_text and last.usage.output_tokens == whole.usage.output_tokens
    assert events[0].response.status == "in_progress" and events[0].response.output == []


def test_stream_helper_gives_the_final_response(served):
    # The helper wants response.completed: an answer that ends before max_output_tokens.
    with served.client.responses.stream(model=NAME, input="Say OK.", max_output_tokens=64, temperature=0) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert final.output_text == text
    assert idle(served)


def test_a_stream_closed_early_frees_its_kv_pages(served):
    stream = greedy(served.client, input=QUESTION, max_output_tokens=200, stream=True)
    for event in stream:
        if event.type == "response.output_text.delta":
            break
    stream.close()
    assert idle(served)


def test_json_schema_format_gives_json_that_follows_the_schema(served):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "population": {"type": "integer", "minimum": 0, "maximum": 99999999}},
              "required": ["city", "population"], "additionalProperties": False}
    response = greedy(served.client, input="Name a big city and its population, as JSON.", max_output_tokens=40,
                      text={"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}})
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), schema)
    assert response.text.format.type == "json_schema" and response.text.format.name == "city"


# -- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, param", [
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"conversation": "conv_123"}, "conversation"),
])
def test_stored_state_is_refused_saying_the_server_keeps_none(served, extra, param):
    with pytest.raises(openai.BadRequestError) as error:
        served.client.responses.create(model=NAME, input=QUESTION, **extra)
    assert error.value.body["param"] == param and "keeps no state" in error.value.body["message"]


def test_an_unknown_model_is_404(served):
    with pytest.raises(openai.NotFoundError):
        served.client.responses.create(model="gpt-4o", input=QUESTION)


@pytest.mark.parametrize("extra, param", [
    ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, "input[0]"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
     "input[0].content[0]"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
    ({"input": []}, "input"),
    ({"tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}]}, "tools"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"background": True}, "background"),
    ({"text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"temperature": -1}, "temperature"),
])
def test_bad_or_unsupported_requests_are_400_naming_the_field(served, extra, param):
    body = {"input": QUESTION, **extra}
    with pytest.raises(openai.BadRequestError) as error:
        served.client.responses.create(model=NAME, **body)
    assert error.value.body["param"] == param, error.value.body
    assert error.value.body["type"] == "invalid_request_error"


def test_tools_on_a_template_without_tool_calls_are_refused(served):
    with pytest.raises(openai.BadRequestError) as error:
        served.client.responses.create(model=NAME, input=QUESTION, tools=[WEATHER])
    assert "does not support tool calls" in error.value.body["message"]
    assert idle(served)


# -- tools (Qwen2.5-Coder, Hermes) ---------------------------------------------------------------

WEATHER_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                      "required": ["city"], "additionalProperties": False}
WEATHER = {"type": "function", "name": "get_weather", "description": "The current weather in a city.",
           "parameters": WEATHER_PARAMETERS, "strict": True}
WEATHER_QUESTION = "What is the weather like in Paris today?"


def ask_weather(client, **kwargs):
    return greedy(client, model="qwen", input=WEATHER_QUESTION, tools=[WEATHER], max_output_tokens=48, **kwargs)


def test_required_tool_choice_returns_a_function_call_following_the_schema(served_qwen):
    response = ask_weather(served_qwen.client, tool_choice="required", parallel_tool_calls=False)
    assert response.status == "completed"
    [call] = response.output  # parallel_tool_calls false: one call, then the answer ends
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert call.id.startswith("fc_") and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMETERS)
    assert response.tool_choice == "required" and response.tools[0].name == "get_weather"


def test_streamed_function_call_arguments_concatenate_to_the_whole_call(served_qwen):
    whole = ask_weather(served_qwen.client, tool_choice={"type": "function", "name": "get_weather"})
    events = list(ask_weather(served_qwen.client, tool_choice={"type": "function", "name": "get_weather"},
                              stream=True))
    assert collapse([e.type for e in events]) == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    [call] = whole.output
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert arguments == call.arguments
    assert events[2].item.name == "get_weather" and events[2].item.arguments == ""
    done = events[-2].item
    assert (done.name, done.arguments, done.status) == ("get_weather", call.arguments, "completed")
    assert events[-1].response.output[0].arguments == call.arguments


def test_a_follow_up_with_the_call_and_its_output_is_answered_in_text(served_qwen):
    call = ask_weather(served_qwen.client, tool_choice="required", parallel_tool_calls=False).output[0]
    follow_up = [{"role": "user", "content": WEATHER_QUESTION},
                 {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
                 {"type": "function_call_output", "call_id": call.call_id,
                  "output": json.dumps({"temperature_celsius": 21, "sky": "sunny"})}]
    response = greedy(served_qwen.client, model="qwen", input=follow_up, tools=[WEATHER], max_output_tokens=40)
    assert [item.type for item in response.output] == ["message"]
    assert "21" in response.output_text
    assert idle(served_qwen)


# -- the output items, offline: a thinking model's answer with a call ----------------------------

def output_items(pieces: list[str]):
    """The items and event types of an answer fed in `pieces` to the assistant parser of a model that
    thinks and writes Hermes calls."""
    from jaxinfer.api.assistant import AssistantParser, OutputFormat
    from jaxinfer.api.reasoning import ThinkFormat
    from jaxinfer.api.routes.openai_responses import OutputItems

    parser, items = AssistantParser(OutputFormat(tool_calls=True, think=ThinkFormat(False)), True), OutputItems()
    events = [e for piece in pieces for e in items.feed(parser.feed(piece))]
    events += items.feed(parser.finish()) + items.close("completed")
    without_ids = [{k: v for k, v in item.items() if k not in ("id", "call_id")} for item in items.output]
    return without_ids, [kind for kind, _ in events]


ANSWER = '<think>Paris, surely.</think>Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": ' \
         '{"city": "Paris"}}\n</tool_call>'


def test_reasoning_then_message_then_call_streamed_char_by_char_are_the_whole_answers_items():
    whole, whole_events = output_items([ANSWER])
    streamed, events = output_items(list(ANSWER))
    assert streamed == whole == [
        {"type": "reasoning", "summary": [], "status": "completed",
         "content": [{"type": "reasoning_text", "text": "Paris, surely."}]},
        {"type": "message", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": "Let me check.", "annotations": [], "logprobs": []}]},
        {"type": "function_call", "name": "get_weather", "arguments": '{"city": "Paris"}', "status": "completed"}]
    assert collapse(events) == collapse(whole_events) == [
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done"]


def test_an_empty_answer_is_one_empty_message():
    items, _ = output_items([])
    assert [(i["type"], i["content"][0]["text"]) for i in items] == [("message", "")]


def test_raw_stream_names_each_event_in_an_event_line(served):
    import httpx

    body = {"model": NAME, "input": QUESTION, "max_output_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{served.url}/v1/responses", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        blocks = response.read().decode().strip().split("\n\n")
    for block in blocks:
        event, data = block.split("\n")
        assert event.startswith("event: ") and data.startswith("data: ")
        assert json.loads(data.removeprefix("data: "))["type"] == event.removeprefix("event: ")
    assert blocks[-1].startswith("event: response.incomplete")


def test_auto_tool_choice_parses_the_call_the_model_writes(served_qwen):
    response = ask_weather(served_qwen.client)  # tool_choice auto: the default with tools
    assert response.tool_choice == "auto"
    [call] = response.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
