"""Anthropic's Messages API: a request body checked and turned into chat-template messages, sampling
parameters and a tool request; the response, its server-sent events and its errors in Anthropic's
shapes (the route: jaxinfer/api/routes/messages.py).

Content blocks are text, tool_use and tool_result; `output_config.format` (a JSON schema) constrains
the text as structured outputs. What the engine cannot do (images, documents, extended thinking,
server tools, MCP) is refused with a 400 that names the field, as protocol.py refuses OpenAI's
unimplemented fields. Unknown top-level fields are ignored: `metadata`, `service_tier`, `speed`,
`cache_control` (the prefix cache is automatic) and `output_config.effort` (nothing here thinks
longer or shorter) ask for nothing the answer would show. Newer `anthropic` clients have no
`temperature`, `top_p` or `top_k` arguments: they are read when sent (`extra_body`).
"""

import json
import math
import uuid
from dataclasses import dataclass

from jaxinfer.api import tool_calls
from jaxinfer.api.errors import APIError, short_repr
from jaxinfer.api.fields import nullable
from jaxinfer.api.protocol import MAX_TOP_K
from jaxinfer.api.tool_calls import ToolRequest
from jaxinfer.sampling import SamplingParams, StructuredOutputsParams

ROLES = ("user", "assistant")
# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors).
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
               429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}
OVERLOADED = 529  # Anthropic's status for "busy, retry": our 503 with code "overloaded"
# Top-level fields of features not implemented here; each is refused unless null.
NOT_IMPLEMENTED = {"mcp_servers": "MCP servers", "container": "code-execution containers",
                   "context_management": "context management"}


# The request as JSON Schema, published at /openapi.json (api/openapi.py); parse_messages_request
# checks every constraint stated here (and more: roles' blocks, tool names, ...).
_STRING = {"type": "string"}
_TEXT_BLOCK = {"type": "object", "required": ["type", "text"],
               "properties": {"type": {"const": "text"}, "text": _STRING}}
_BLOCK = {"anyOf": [
    _TEXT_BLOCK,
    {"type": "object", "required": ["type", "id", "name", "input"], "description": "assistant messages only",
     "properties": {"type": {"const": "tool_use"}, "id": _STRING, "name": _STRING, "input": {"type": "object"}}},
    {"type": "object", "required": ["type", "tool_use_id"], "description": "user messages only",
     "properties": {"type": {"const": "tool_result"}, "tool_use_id": _STRING,
                    "content": nullable({"anyOf": [_STRING, {"type": "array", "items": _TEXT_BLOCK}]}),
                    "is_error": nullable({"type": "boolean"})}},
]}
_UNIT = {"type": "number", "minimum": 0, "maximum": 1}
MESSAGES_REQUEST = {"type": "object", "description": "POST /v1/messages", "required": ["max_tokens", "messages"],
                    "properties": {
    "model": {"anyOf": [_STRING, {"type": "null"}]},
    "max_tokens": {"type": "integer", "minimum": 1, "description": "Bounded by the context left."},
    "messages": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["role", "content"],
        "properties": {"role": {"enum": list(ROLES)},
                       "content": {"anyOf": [_STRING, {"type": "array", "items": _BLOCK}]}}}},
    "system": {"anyOf": [_STRING, {"type": "array", "items": _TEXT_BLOCK}, {"type": "null"}]},
    "stop_sequences": {"anyOf": [{"type": "array", "items": {"type": "string", "minLength": 1}}, {"type": "null"}]},
    "temperature": {"anyOf": [_UNIT, {"type": "null"}]},
    "top_p": {"anyOf": [_UNIT, {"type": "null"}]},
    "top_k": {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "null"}]},
    "stream": {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
}}


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def tool_use_id(call_id: str) -> str:
    """Anthropic's id for a tool call (hermes.new_call_id's `call_...`)."""
    return "toolu_" + call_id.removeprefix("call_")


# -- the request --------------------------------------------------------------------------------

@dataclass(slots=True)
class MessagesRequest:
    """A checked /v1/messages body."""

    model: str | None
    messages: list[dict]  # as the chat template takes them (system first, tool calls and results)
    prefill: str  # a final assistant turn's text, which the answer continues ("" if none)
    params: SamplingParams  # max_tokens as asked; the route bounds it by the context left
    tool_request: ToolRequest  # its constraint (tool_choice any or tool) is the route's: it needs the tokenizer
    stream: bool


def parse_messages_request(body: dict, defaults: dict | None = None) -> MessagesRequest:
    """`defaults`: the model's own sampling defaults (`jaxinfer.generation_config`) for what the body
    leaves out."""
    for name, what in NOT_IMPLEMENTED.items():
        if body.get(name) is not None:
            raise APIError(400, f"'{name}' is not supported: {what} are not implemented", param=name)
    thinking = body.get("thinking")
    if thinking is not None and not (isinstance(thinking, dict) and thinking.get("type") == "disabled"):
        raise APIError(400, "'thinking' is not supported: extended thinking is not implemented (only "
                       "{'type': 'disabled'})", param="thinking")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", "a string", model)
    max_tokens = _number(body, "max_tokens", integer=True, minimum=1)
    if max_tokens is None:
        raise APIError(400, "'max_tokens' is required", param="max_tokens")
    tools = _tools(body.get("tools"))
    tool_request = _tool_choice(body.get("tool_choice"), tools)
    messages = _system(body.get("system")) + _messages(body.get("messages"))
    prefill = ""
    if messages[-1]["role"] == "assistant" and "tool_calls" not in messages[-1]:
        prefill = messages.pop()["content"]
        if prefill != prefill.rstrip():
            raise APIError(400, "the final assistant message's content cannot end with whitespace",
                           param="messages")
    stop = body.get("stop_sequences")
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise _bad("stop_sequences", "a list of non-empty strings", stop)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream", "a boolean", stream)
    defaults = defaults or {}
    top_k = _number(body, "top_k", integer=True, minimum=0)
    values = dict(temperature=_number(body, "temperature", minimum=0, maximum=1, default=defaults.get("temperature", 1.0)),
                  top_p=_number(body, "top_p", minimum=0, maximum=1, default=defaults.get("top_p", 1.0)),
                  top_k=min(top_k, MAX_TOP_K) if top_k else -1 if top_k is not None else defaults.get("top_k", -1),
                  max_tokens=max_tokens, stop=stop,
                  structured_outputs=_output_format(body.get("output_config"), tool_request))
    try:
        params = SamplingParams(**(defaults | values))
    except ValueError as e:  # "SamplingParams.<field> must be ...": in the client's names
        field, rest = str(e).removeprefix("SamplingParams.").split(" ", 1)
        param = {"stop": "stop_sequences"}.get(field, field)
        raise APIError(400, f"'{param}' {rest}", param=param) from None
    return MessagesRequest(model, messages, prefill, params, tool_request, bool(stream))


def _output_format(config, tool_request: ToolRequest) -> StructuredOutputsParams | None:
    """`output_config.format` ({"type": "json_schema", "schema": {...}}): the text is JSON that follows it."""
    if config is None:
        return None
    if not isinstance(config, dict):
        raise _bad("output_config", "an object", config)
    spec = config.get("format")
    if spec is None:
        return None
    param = "output_config.format"
    if not (isinstance(spec, dict) and spec.get("type") == "json_schema" and isinstance(spec.get("schema"), dict)):
        raise _bad(param, "{'type': 'json_schema', 'schema': {...}}", spec)
    if tool_request.mode == "required":
        raise APIError(400, f"'{param}' cannot be combined with tool_choice 'any' or 'tool' (each constrains the "
                       "whole answer)", param=param)
    try:
        return StructuredOutputsParams(json=spec["schema"])
    except ValueError as e:
        raise APIError(400, f"'{param}': {e}", param=param) from None


def _bad(name: str, expected: str, value) -> APIError:
    return APIError(400, f"'{name}' must be {expected}, got {short_repr(value)}", param=name)


def _number(body: dict, name: str, *, integer: bool = False, minimum=None, maximum=None, default=None):
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    try:
        ok = ok and math.isfinite(value) and (not integer or float(value).is_integer())
    except OverflowError:  # an integer past float's range
        ok = False
    ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        bounds = " and ".join(f"{word} {limit}" for word, limit in ((">=", minimum), ("<=", maximum))
                              if limit is not None)
        raise _bad(name, f"{'an integer' if integer else 'a number'} {bounds}".rstrip(), value)
    return int(value) if integer else float(value)


def _text_blocks(content, where: str) -> str:
    """A string, or text blocks joined by newlines."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(where, "a string or a list of text blocks", content)
    for i, block in enumerate(content):
        _check_block(block, f"{where}[{i}]", ("text",))
    return "\n".join(block["text"] for block in content)


def _check_block(block, where: str, allowed: tuple[str, ...]) -> str:
    """The block's type, once its type and fields are checked."""
    kind = block.get("type") if isinstance(block, dict) else None
    if not isinstance(kind, str):
        raise _bad(where, "a content block (an object with a 'type')", block)
    if kind not in allowed:
        known = kind in ("text", "tool_use", "tool_result")
        raise APIError(400, f"{where}: {'here ' if known else ''}'{kind}' blocks are not supported (only "
                       f"{', '.join(allowed)})", param=where)
    if kind == "text" and not isinstance(block.get("text"), str):
        raise _bad(f"{where}.text", "a string", block.get("text"))
    if kind == "tool_use":
        if not (isinstance(block.get("id"), str) and isinstance(block.get("name"), str)):
            raise _bad(where, "a tool_use block with an 'id' and a 'name' (strings)", block)
        if not isinstance(block.get("input"), dict):
            raise _bad(f"{where}.input", "an object", block.get("input"))
    if kind == "tool_result":
        if not isinstance(block.get("tool_use_id"), str):
            raise _bad(f"{where}.tool_use_id", "a string", block.get("tool_use_id"))
        if not isinstance(block.get("is_error", False), (bool, type(None))):
            raise _bad(f"{where}.is_error", "a boolean", block.get("is_error"))
    return kind


def _system(system) -> list[dict]:
    if system is None:
        return []
    text = _text_blocks(system, "system")
    return [{"role": "system", "content": text}] if text else []


def _messages(messages) -> list[dict]:
    """Anthropic's messages as chat-template messages: an assistant's tool_use blocks become its
    `tool_calls`, a user's tool_result blocks `tool` messages (before the user's text, if any)."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of messages", param="messages")
    converted = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(where, "an object with 'role' and 'content'", message)
        role = message.get("role")
        if role not in ROLES:
            raise APIError(400, f"{where}.role must be one of {', '.join(ROLES)}, got {short_repr(role)}",
                           param=f"{where}.role")
        content = message.get("content")
        if isinstance(content, str):
            converted.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise _bad(f"{where}.content", "a string or a list of content blocks", content)
        allowed = ("text", "tool_use") if role == "assistant" else ("text", "tool_result")
        texts, calls = [], []
        for j, block in enumerate(content):
            block_where = f"{where}.content[{j}]"
            kind = _check_block(block, block_where, allowed)
            if kind == "text":
                texts.append(block["text"])
            elif kind == "tool_use":
                calls.append(tool_calls.template_tool_call(block["id"], block["name"], block["input"], block_where))
            else:
                converted.append({"role": "tool", "tool_call_id": block["tool_use_id"],
                                  "content": _text_blocks(block.get("content") or "", f"{block_where}.content")})
        if role == "assistant":
            converted.append({"role": "assistant", "content": "\n".join(texts),
                              **({"tool_calls": calls} if calls else {})})
        elif texts or not content:
            converted.append({"role": "user", "content": "\n".join(texts)})
    return converted


def _tools(tools) -> list[dict]:
    """Anthropic's client tools ({name, description?, input_schema}) in OpenAI's chat shape."""
    if tools is None:
        return []

    def client_tool(tool, where: str) -> dict:
        if not isinstance(tool, dict):
            raise _bad(where, "an object with a 'name' and an 'input_schema'", tool)
        if tool.get("type") not in (None, "custom"):
            raise APIError(400, f"{where}: server tools ('type': {short_repr(tool['type'])}) are not supported; "
                           "only client tools (name, description, input_schema)", param=f"{where}.type")
        if not isinstance(tool.get("input_schema"), dict):
            raise _bad(f"{where}.input_schema", "a JSON schema (an object)", tool.get("input_schema"))
        return tool_calls.check_function(tool, where, parameters_key="input_schema")

    return tool_calls.check_tool_list(tools, client_tool)


def _tool_choice(choice, tools: list[dict]) -> ToolRequest:
    """{"type": "auto" | "any" | "tool" (with "name") | "none"}; without it "auto" (with tools)."""
    param = "tool_choice"
    kind = choice.get("type") if isinstance(choice, dict) else None
    if choice is None:
        kind = "auto"
    elif kind not in ("auto", "any", "tool", "none"):
        raise _bad(param, "{'type': 'auto' | 'any' | 'tool' | 'none'}", choice)
    if kind != "none" and not tools and choice is not None:
        raise APIError(400, f"'{param}' is {kind!r} but the request has no tools", param=param)
    if kind == "tool":
        return tool_calls.named_choice(choice.get("name"), tools, param)
    mode = {"auto": "auto" if tools else "none", "any": "required", "none": "none"}[kind]
    disable_parallel = choice.get("disable_parallel_tool_use") if isinstance(choice, dict) else None
    if disable_parallel is not None and not isinstance(disable_parallel, bool):
        raise _bad(f"{param}.disable_parallel_tool_use", "a boolean", disable_parallel)
    return ToolRequest(tools, mode, parallel=not disable_parallel)


# -- the response -------------------------------------------------------------------------------

def message(message_id: str, model: str, content: list[dict], stop_reason: str | None,
            stop_sequence: str | None, input_tokens: int, output_tokens: int) -> dict:
    return {"id": message_id, "type": "message", "role": "assistant", "content": content, "model": model,
            "stop_reason": stop_reason, "stop_sequence": stop_sequence,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}}


def text_block(text: str) -> dict:
    return {"type": "text", "text": text}


def thinking_block(thinking: str) -> dict:
    return {"type": "thinking", "thinking": thinking, "signature": ""}  # nothing signs it here


def tool_use_block(call_id: str, name: str, input_: dict) -> dict:
    return {"type": "tool_use", "id": tool_use_id(call_id), "name": name, "input": input_}


def tool_input(arguments: str) -> dict:
    """A call's arguments as the tool_use input: {} if the model's JSON text is not an object (cut
    short by max_tokens, or written wrong without a constraint)."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def event(name: str, data: dict) -> str:
    """One server-sent event as Anthropic writes them: `event: <type>` then its JSON."""
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


# -- errors -------------------------------------------------------------------------------------

def error_body(error_type: str, message: str) -> dict:
    return {"type": "error", "error": {"type": error_type, "message": message}}


def error_of(e: APIError) -> tuple[int, dict]:
    """An API error (raised by this route or the code it shares) as Anthropic's status and body."""
    status = OVERLOADED if e.code == "overloaded" else e.status
    return status, error_body(ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error"),
                              e.message)
