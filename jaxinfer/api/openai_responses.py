"""OpenAI's Responses API, stateless (`POST /v1/responses`): the request checked and turned into chat
messages, tools and SamplingParams, and the shapes of what is answered (the response object, its
output items, usage). The route and its server-sent events: jaxinfer/api/routes/openai_responses.py.

The server keeps nothing: `store` is accepted but the response says `"store": false`, and what would
need a stored response or conversation (`previous_response_id`, `conversation`, `item_reference`
items) is refused. The input is read as vLLM's Responses implementation reads it: messages become
chat messages (`developer` as `system`), `function_call` items an assistant message's `tool_calls`,
`function_call_output` items `tool` messages, all rendered with the model's own chat template.
Reasoning items in the input are dropped, as chat templates drop earlier turns' thinking.
"""

import uuid
from dataclasses import dataclass, field

from jaxinfer.api import tool_calls
from jaxinfer.api.assistant import OutputFormat
from jaxinfer.api.errors import APIError, short_repr
from jaxinfer.api.fields import (boolean_field, integer_field, not_implemented, number_field, read_field,
                                 refuse_not_implemented)
from jaxinfer.api.tool_calls import ToolRequest
from jaxinfer.sampling import SamplingParams, StructuredOutputsParams

MESSAGE_ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = ("input_text", "output_text")
_NO_STATE = "this server keeps no state (responses are not stored): send the whole conversation in 'input'"

# The request's fields as JSON Schema (published by /openapi.json); the scalars are checked against
# it by protocol's readers, the rest by the functions below.
RESPONSES_FIELDS = {
    "model": {"type": "string", "description": "The served model's name (GET /v1/models); another is a 404."},
    "input": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}, "minItems": 1}],
              "description": "A user message's text, or a list of items: messages (roles user, system, "
                             "developer, assistant; text parts), function_call and function_call_output."},
    "instructions": {"type": "string", "description": "A system message put before the input."},
    "max_output_tokens": integer_field("Tokens generated at most (default: up to max_model_len); reaching it "
                                  "makes the response incomplete.", minimum=1),
    "temperature": number_field("0 is greedy.", minimum=0, maximum=2, default=1.0),
    "top_p": number_field("Sample from the most likely tokens whose probabilities add up to top_p.",
                     exclusiveMinimum=0, maximum=1, default=1.0),
    "stream": boolean_field("Answer as server-sent events (response.created ... response.completed).", default=False),
    "tools": {"type": "array", "items": {"type": "object"},
              "description": "Function tools: {type: function, name, description, parameters, strict}."},
    "tool_choice": {"anyOf": [{"enum": ["none", "auto", "required"]},
                              {"type": "object", "required": ["type", "name"]}],
                    "description": "none, auto (the default with tools), required, or {type: function, name}."},
    "parallel_tool_calls": boolean_field("With tool_choice required: false allows one call only.", default=True),
    "text": {"type": "object", "description": "{format: {type: text | json_object | json_schema, name, schema, "
                                              "strict}}: the text is forced to follow the format."},
    "reasoning": {"type": "object", "description": "Accepted on a model that thinks (its effort is not "
                                                   "applied); refused on one that does not."},
    "store": boolean_field("Accepted; nothing is stored (the response says store: false).", default=False),
    "metadata": {"type": "object", "description": "Echoed back."},
    "user": {"type": "string", "description": "Ignored."},
    "previous_response_id": not_implemented(None, "stored responses (" + _NO_STATE + ")"),
    "conversation": not_implemented(None, "conversations (" + _NO_STATE + ")"),
    "background": not_implemented(False, "background responses"),
    "prompt": not_implemented(None, "stored prompt templates"),
    "include": not_implemented([], "include"),
    "top_logprobs": not_implemented(0, "logprobs"),
    "max_tool_calls": not_implemented(None, "max_tool_calls"),
    "truncation": not_implemented("disabled", "truncation"),
}
RESPONSES_REQUIRED = ("input",)


@dataclass(slots=True)
class ResponsesRequest:
    """A checked /v1/responses body."""

    model: str | None
    messages: list[dict]  # chat messages for the template, tool calls in its shape
    tool_request: ToolRequest
    params: SamplingParams
    stream: bool
    structured_outputs_param: str | None  # the field that gave params.structured_outputs
    echo: dict = field(default_factory=dict)  # the request's settings as the response repeats them


def parse_responses_request(body: dict, output_format: OutputFormat, tokenizer,
                            defaults: dict | None = None) -> ResponsesRequest:
    """`tokenizer` writes the grammar of a required tool call."""
    fields = RESPONSES_FIELDS
    if body.get("previous_response_id") is not None or body.get("conversation") is not None:
        name = "previous_response_id" if body.get("previous_response_id") is not None else "conversation"
        raise APIError(400, f"'{name}' is not supported: {_NO_STATE}", param=name)
    refuse_not_implemented(body, fields)
    instructions = read_field(body, fields, "instructions")
    messages = ([{"role": "system", "content": instructions}] if instructions is not None else []) \
        + input_messages(body.get("input"))
    tools = _tools(body.get("tools"))
    if tools and not output_format.tool_calls:
        raise APIError(400, "this model's chat template does not support tool calls (jaxinfer parses the Hermes "
                       "<tool_call> format, which Qwen2.5's template writes)", param="tools")
    tool_request = _tool_choice(body.get("tool_choice"), tools)
    tool_request.parallel = read_field(body, fields, "parallel_tool_calls", True)
    text_format, constraint = _text_format(body.get("text"))
    if constraint is not None and tool_request.mode == "required":
        raise APIError(400, "'text.format' constrains the text, which a required tool call constrains already: "
                       "give one or the other", param="text.format")
    constraint_param = "text.format" if constraint is not None else None
    if tool_request.mode == "required":
        constraint, constraint_param = tool_calls.constraint(tool_request, tokenizer), "tools"
    reasoning = body.get("reasoning")
    if reasoning is not None:
        if not isinstance(reasoning, dict):
            raise APIError(400, f"'reasoning' must be an object, got {short_repr(reasoning)}", param="reasoning")
        if any(v is not None for v in reasoning.values()) and output_format.think is None:
            raise APIError(400, "'reasoning' is not supported: this model does not think (its chat template "
                           "has no reasoning)", param="reasoning")
    metadata = body.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise APIError(400, f"'metadata' must be an object of strings, got {short_repr(metadata)}", param="metadata")
    for name in ("store", "user"):
        read_field(body, fields, name)
    max_output_tokens = read_field(body, fields, "max_output_tokens")
    defaults = defaults or {}  # the model's own (`jaxinfer.generation_config`) for what the body leaves out
    temperature = read_field(body, fields, "temperature", defaults.get("temperature", 1.0))
    top_p = read_field(body, fields, "top_p", defaults.get("top_p", 1.0))
    try:
        params = SamplingParams(**(defaults | dict(n=1, temperature=temperature, top_p=top_p,
                                                   max_tokens=max_output_tokens, structured_outputs=constraint)))
    except ValueError as e:
        raise APIError(400, str(e)) from None
    echo = {"instructions": instructions, "max_output_tokens": max_output_tokens, "metadata": metadata or {},
            "parallel_tool_calls": tool_request.parallel, "reasoning": reasoning, "temperature": temperature,
            "top_p": top_p, "text": {"format": text_format}, "tools": _echo_tools(body.get("tools") or []),
            "tool_choice": _echo_tool_choice(tool_request)}
    return ResponsesRequest(read_field(body, fields, "model"), messages, tool_request, params,
                            read_field(body, fields, "stream", False), constraint_param, echo)


# -- the input ----------------------------------------------------------------------------------

def input_messages(items) -> list[dict]:
    """`input` as chat messages: a string is one user message."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not (isinstance(items, list) and items):
        raise APIError(400, f"'input' must be a string or a non-empty list of items, got {short_repr(items)}",
                       param="input")
    messages = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise APIError(400, f"{where} must be an object, got {short_repr(item)}", param=where)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            messages.append(_message(item, where))
        elif kind == "function_call":
            call_id, name, arguments = (item.get(k) for k in ("call_id", "name", "arguments"))
            if not all(isinstance(v, str) for v in (call_id, name, arguments)):
                raise APIError(400, f"{where} must be {{'type': 'function_call', 'call_id', 'name', 'arguments' "
                               f"(JSON text)}}, got {short_repr(item)}", param=where)
            call = tool_calls.template_tool_call(call_id, name, arguments, where)
            if not (messages and messages[-1]["role"] == "assistant"):
                messages.append({"role": "assistant", "content": ""})
            messages[-1].setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str):
                raise APIError(400, f"{where}.call_id must be a string", param=f"{where}.call_id")
            messages.append({"role": "tool", "tool_call_id": call_id,
                             "content": _text(item.get("output"), f"{where}.output")})
        elif kind == "reasoning":
            continue  # earlier thinking: chat templates leave it out
        elif kind == "item_reference":
            raise APIError(400, f"{where}: item references are not supported: {_NO_STATE}", param=where)
        else:
            raise APIError(400, f"{where}: items of type {short_repr(kind)} are not supported (only message, "
                           "function_call, function_call_output and reasoning)", param=where)
    return messages


def _message(item: dict, where: str) -> dict:
    role = item.get("role")
    if role not in MESSAGE_ROLES:
        raise APIError(400, f"{where}.role must be one of {', '.join(MESSAGE_ROLES)}, got {short_repr(role)}",
                       param=f"{where}.role")
    return {"role": "system" if role == "developer" else role, "content": _text(item.get("content"),
                                                                                 f"{where}.content")}


def _text(content, where: str) -> str:
    """A string, or text parts (input_text, output_text) joined by newlines."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where} must be a string or a list of text parts, got {short_repr(content)}",
                       param=where)
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
            raise APIError(400, f"{where}[{j}]: only text parts ({', '.join(TEXT_PARTS)}) are supported, got "
                           f"{short_repr(part)}", param=f"{where}[{j}]")
    return "\n".join(part["text"] for part in content)


# -- tools and the text format ------------------------------------------------------------------

def _tools(tools) -> list[dict]:
    """Responses function tools ({type: function, name, ...}) in the chat shape the template takes."""
    if tools is None:
        return []

    def function_tool(tool, where: str) -> dict:
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise APIError(400, f"{where}: only function tools are supported (no built-in tools), got type "
                           f"{short_repr(kind)}", param=where)
        if not isinstance(tool.get("strict", True), (bool, type(None))):
            raise APIError(400, f"{where}.strict must be a boolean", param=f"{where}.strict")
        return tool_calls.check_function(tool, where)

    return tool_calls.check_tool_list(tools, function_tool)


def _tool_choice(choice, tools: list[dict]) -> ToolRequest:
    if isinstance(choice, dict):
        if choice.get("type") != "function":
            raise APIError(400, f"'tool_choice' must be 'none', 'auto', 'required' or {{'type': 'function', 'name': "
                           f"...}}, got {short_repr(choice)}", param="tool_choice")
        return tool_calls.named_choice(choice.get("name"), tools, "tool_choice")
    return tool_calls.check_tool_choice(choice, tools, "tool_choice")


def _text_format(text) -> tuple[dict, StructuredOutputsParams | None]:
    """`text.format` as the response repeats it, and the constraint it asks for."""
    if text is None:
        return {"type": "text"}, None
    fmt = text.get("format") if isinstance(text, dict) else None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if fmt is None and isinstance(text, dict) or kind == "text":
        return {"type": "text"}, None
    if kind == "json_object":
        return {"type": "json_object"}, StructuredOutputsParams(json_object=True)
    if kind != "json_schema":
        raise APIError(400, "'text.format' must be an object with type text, json_object or json_schema, got "
                       f"{short_repr(fmt if isinstance(text, dict) else text)}", param="text.format")
    if not (isinstance(fmt.get("name"), str) and isinstance(fmt.get("schema"), dict)
            and isinstance(fmt.get("description", ""), str)
            and isinstance(fmt.get("strict", False), (bool, type(None)))):
        raise APIError(400, "'text.format' of type json_schema needs a 'name' (a string) and a 'schema' (an object), "
                       f"and optionally 'description' and 'strict', got {short_repr(fmt)}", param="text.format")
    try:
        constraint = StructuredOutputsParams(json=fmt["schema"])
    except ValueError as e:
        raise APIError(400, f"'text.format': {e}", param="text.format") from None
    return {k: fmt[k] for k in ("type", "name", "schema", "description", "strict") if k in fmt}, constraint


def _echo_tools(tools: list[dict]) -> list[dict]:
    return [{"type": "function", "name": t["name"], "description": t.get("description"),
             "parameters": t.get("parameters"), "strict": t.get("strict", True)} for t in tools]


def _echo_tool_choice(request: ToolRequest):
    if request.function is not None:
        return {"type": "function", "name": request.function}
    return request.mode


# -- the response -------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def response_object(response_id: str, created_at: int, model: str, echo: dict, output: list[dict], status: str,
                    usage_: dict | None = None) -> dict:
    """The Response; `status` "in_progress", "completed" or "incomplete" (the output-token limit)."""
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    return {"id": response_id, "object": "response", "created_at": created_at, "status": status,
            "background": False, "error": None, "incomplete_details": incomplete, "model": model, "output": output,
            "previous_response_id": None, "store": False, "truncation": "disabled", "usage": usage_,
            "user": None, **echo}


def usage(input_tokens: int, output_tokens: int, cached_tokens: int = 0, reasoning_tokens: int = 0) -> dict:
    return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": cached_tokens},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": input_tokens + output_tokens}


def reasoning_item(item_id: str, text: str, status: str) -> dict:
    return {"type": "reasoning", "id": item_id, "summary": [], "status": status,
            "content": [reasoning_part(text)] if text or status != "in_progress" else []}


def reasoning_part(text: str) -> dict:
    return {"type": "reasoning_text", "text": text}


def message_item(item_id: str, text: str, status: str) -> dict:
    return {"type": "message", "id": item_id, "role": "assistant", "status": status,
            "content": [output_text_part(text)] if status != "in_progress" else []}


def output_text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}
