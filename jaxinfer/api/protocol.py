"""The OpenAI protocol: request bodies checked and turned into SamplingParams, errors as OpenAI's
`{"error": {...}}` (jaxinfer/api/errors.py; responses and streaming chunks: jaxinfer/api/completion_shapes.py).

Requests are plain JSON dicts checked field by field: a wrong type or value is an `APIError` (400)
that names the field in `param`. Fields that OpenAI or vLLM define and we do not implement are
refused with a message that says so, rather than silently ignored; unknown fields are ignored. The
fields are declared once, as JSON Schema (COMPLETION_FIELDS, CHAT_FIELDS): the readers of
jaxinfer/api/fields.py check bodies against those tables and /openapi.json publishes them.
"""

import dataclasses
import functools
from dataclasses import dataclass, field

from jaxinfer.api import tool_calls as tool_calls_
from jaxinfer.api.errors import ERROR_TYPES, APIError, error_body, short_repr  # noqa: F401 (re-exported)
from jaxinfer.api.fields import (bad, boolean_field, integer_field, is_int, is_number, not_implemented, nullable,
                                 number_field, read_field, refuse_not_implemented)
from jaxinfer.sampling import (MAX_BIAS, MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_STOP, MAX_STOP_LENGTH, MAX_STOP_TOKEN_IDS, SamplingParams,
                               StructuredOutputsParams)

MAX_N = 16  # choices per request
MAX_PROMPTS = 64  # prompts in one /v1/completions request
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# The engine keeps seeds (seed + i for choice i) and top_k in int32 arrays.
SEED_RANGE = 2**31 - MAX_N  # seeds are reduced into [0, SEED_RANGE)
MAX_TOP_K = 2**30  # larger is the same as no limit: top_k is clamped to it

# -- the fields of each request -----------------------------------------------------------------
# Each request's fields as JSON Schema (OpenAPI 3.1), published by /openapi.json (api/openapi.py) and
# checked by the readers below: every scalar field against its schema's type and bounds, every
# field marked "x-not-implemented" refused unless it holds the one value that asks for nothing. So
# the schema says what is checked. Every field but `prompt`/`messages` is optional; null is "not given".

_TEXT = {"type": "string", "minLength": 1}
# Structured outputs: the grammar's text is forced to follow (jaxinfer/structured_outputs.py).
_JSON_SCHEMA = {"anyOf": [{"type": "object"}, {"type": "string"}], "description": "A JSON schema, or its JSON text."}
_CHOICE = {"type": "array", "items": {"type": "string"}, "minItems": 1}
_REGEX = {"type": "string", "description": "The whole text matches it (Rust regex syntax)."}
_GRAMMAR = {"type": "string", "minLength": 1, "description": "A Lark or GBNF grammar (llguidance's dialects)."}
STRUCTURED_OUTPUTS_FIELDS = {"json": _JSON_SCHEMA, "regex": _REGEX, "choice": _CHOICE, "grammar": _GRAMMAR,
                             "json_object": {"type": "boolean", "description": "Any JSON object."}}
_RESPONSE_FORMAT = {"anyOf": [
    {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
    {"type": "object", "required": ["type", "json_schema"], "properties": {
        "type": {"const": "json_schema"},
        "json_schema": {"type": "object", "required": ["name", "schema"], "properties": {
            "name": {"type": "string"}, "description": {"type": "string"}, "schema": {"type": "object"},
            "strict": nullable({"type": "boolean", "description": "The schema is enforced either way."})}}}},
], "description": "OpenAI's: text (no constraint), json_object (any JSON object) or json_schema (JSON that "
                  "follows the schema). At most one of response_format, structured_outputs, guided_*."}
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_STOP = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_LENGTH}

STREAM_OPTIONS_FIELDS = {
    "include_usage": boolean_field("A last chunk with the request's usage and no choices.", default=False),
}

COMMON_FIELDS = {
    "model": {"type": "string", "description": "The served model's name (GET /v1/models); another is a 404."},
    "n": integer_field("Choices generated for each prompt.", minimum=1, maximum=MAX_N, default=1),
    "temperature": number_field("0 is greedy.", minimum=0, default=1.0),
    "top_p": number_field("Sample from the most likely tokens whose probabilities add up to top_p.",
                     exclusiveMinimum=0, maximum=1, default=1.0),
    "top_k": integer_field("vLLM's: sample from the k most likely tokens; -1 or 0 is off.", minimum=-1, default=-1),
    "min_p": number_field("vLLM's: drop tokens less likely than min_p times the most likely one.",
                     minimum=0, maximum=1, default=0.0),
    "presence_penalty": number_field("Subtracted from the logit of every token already generated.",
                                minimum=-2, maximum=2, default=0.0),
    "frequency_penalty": number_field("Subtracted from a token's logit once per time it was generated.",
                                 minimum=-2, maximum=2, default=0.0),
    "repetition_penalty": number_field("vLLM's (HF/CTRL style, over prompt and output): > 1 discourages repeats.",
                                  exclusiveMinimum=0, default=1.0),
    "stop": {"anyOf": [_STOP, {"type": "array", "items": _STOP, "maxItems": MAX_STOP}],
             "description": "Generation ends before the first of these strings; it is not returned."},
    "stop_token_ids": {"type": "array", "items": {"type": "integer", "minimum": 0}, "maxItems": MAX_STOP_TOKEN_IDS,
                       "description": "vLLM's: generation ends after any of these tokens."},
    "seed": integer_field("Reproducible sampling: choice i draws with seed + i."),
    "ignore_eos": boolean_field("vLLM's: go on past the end-of-sequence token.", default=False),
    "skip_special_tokens": boolean_field("vLLM's: leave special tokens out of the text.", default=True),
    "stream": boolean_field("Answer as server-sent events, one chunk per new text, then `data: [DONE]`.",
                       default=False),
    "stream_options": {"type": "object", "description": "Only with stream: true.",
                       "properties": {k: nullable(v) for k, v in STREAM_OPTIONS_FIELDS.items()}},
    "cache_salt": {"type": "string", "minLength": 1,
                   "description": "vLLM's: only requests with the same salt share prefix-cache pages."},
    "response_format": _RESPONSE_FORMAT,
    "structured_outputs": {"type": "object", "additionalProperties": False,
                           "properties": {key: nullable(value) for key, value in STRUCTURED_OUTPUTS_FIELDS.items()},
                           "description": "vLLM's: exactly one of these constraints on the text."},
    "guided_json": {**_JSON_SCHEMA, "description": "vLLM's older name of structured_outputs.json."},
    "guided_regex": {**_REGEX, "description": "vLLM's older name of structured_outputs.regex."},
    "guided_choice": {**_CHOICE, "description": "vLLM's older name of structured_outputs.choice."},
    "guided_grammar": {**_GRAMMAR, "description": "vLLM's older name of structured_outputs.grammar."},
    "logit_bias": {"type": "object", "maxProperties": MAX_LOGIT_BIAS,
                   "additionalProperties": {"type": "number", "minimum": -MAX_BIAS, "maximum": MAX_BIAS},
                   "description": "Token ids (as strings) to a bias added to their logits: -100 bans a token, "
                                  "100 all but forces it. The logprobs stay the model's own."},
    "min_tokens": integer_field("vLLM's: no EOS, stop token or stop string ends a choice before this many tokens "
                                "(at most max_tokens).", minimum=0, default=0),
    "prompt_logprobs": integer_field(
        "vLLM's: each prompt token's logprob under the model (but the first's), with its rank and this many most "
        "likely alternatives: `prompt_logprobs` of each choice (completions) or of the response (chat). The "
        "prompt is then computed, not read from the prefix cache. Not with stream.", minimum=0,
        maximum=MAX_LOGPROBS),
}

COMPLETION_FIELDS = {
    "prompt": {"anyOf": [_TEXT, {"type": "array", "items": _TEXT, "minItems": 1, "maxItems": MAX_PROMPTS},
                         _TOKEN_IDS, {"type": "array", "items": _TOKEN_IDS, "minItems": 1, "maxItems": MAX_PROMPTS}],
               "description": "A string, a list of strings, a list of token ids or a list of token-id lists; "
                              "each prompt gets n choices (index = prompt * n + i)."},
    "max_tokens": integer_field("Tokens generated at most per choice; the prompt plus max_tokens must fit in "
                           "max_model_len. 0 (with echo): the prompt alone, no token generated.", minimum=0,
                                default=16),
    "logprobs": integer_field("The chosen token's logprob and this many most likely alternatives (with echo, "
                              "the prompt tokens' too, the first one's null).", minimum=0, maximum=MAX_LOGPROBS),
    "best_of": integer_field("Only best_of = n is supported.", minimum=1),
    "echo": boolean_field("Each choice's text (and logprobs) starts with the prompt's.", default=False),
    "suffix": {"type": "string", "description": (
        "Fill in the middle: the text after the insertion; the choice is what goes between prompt and suffix. "
        "For code models with fill-in-the-middle tokens (Qwen2.5-Coder's <|fim_prefix|>, <|fim_suffix|>, "
        "<|fim_middle|>; StarCoder's, CodeLlama's, DeepSeek-Coder's); the model's end-of-file tokens "
        "(<|endoftext|>...) end it. Not with echo.")},
    **COMMON_FIELDS,
}
COMPLETION_REQUIRED = ("prompt",)

_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
_CONTENT = {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}],
            "description": "Text, or text parts (joined by newlines)."}
_TOOL_CALLS = {"type": "array", "description": "The calls this assistant message made (arguments: JSON text).",
               "items": {"type": "object", "required": ["function"], "properties": {
                   "id": {"type": "string"}, "type": {"const": "function"},
                   "function": {"type": "object", "required": ["name", "arguments"], "properties": {
                       "name": {"type": "string"}, "arguments": {"type": "string"}}}}}}
_MESSAGE = {"anyOf": [  # content may be null (or absent) only in an assistant message
    {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"enum": ["system", "developer", "user"], "description": "developer is read as system."},
        "content": _CONTENT}},
    {"type": "object", "required": ["role"], "properties": {
        "role": {"const": "assistant"}, "content": nullable(_CONTENT), "tool_calls": nullable(_TOOL_CALLS)}},
    {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"const": "tool"}, "content": _CONTENT,
        "tool_call_id": nullable({"type": "string", "description": "The call this answers (null or absent: none)."})}},
]}
_FUNCTION = {"type": "object", "required": ["name"], "properties": {
    "name": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,128}$"}, "description": {"type": "string"},
    "parameters": {"type": "object", "description": "A JSON schema; the arguments follow it when a call is "
                                                    "required (tool_choice required or a named function)."},
    "strict": nullable({"type": "boolean", "description": "Accepted; see parameters."})}}
_TOOLS = {"type": "array", "items": {"type": "object", "required": ["type", "function"], "properties": {
    "type": {"const": "function"}, "function": _FUNCTION}},
    "description": "Functions the model may call, rendered by the model's chat template; only models whose "
                   "template writes Hermes <tool_call>s (Qwen2.5) take them."}
_TOOL_CHOICE = {"anyOf": [{"enum": ["none", "auto", "required"]},
                          {"type": "object", "required": ["type", "function"], "properties": {
                              "type": {"const": "function"},
                              "function": {"type": "object", "required": ["name"],
                                           "properties": {"name": {"type": "string"}}}}}],
                "description": "auto (the default with tools): the model decides; required: one or more calls; "
                               "a named function: exactly that call; none: tools are not rendered. required and "
                               "a named function are enforced by a grammar: the arguments follow the schema."}

CHAT_FIELDS = {
    "messages": {"type": "array", "items": _MESSAGE, "minItems": 1},
    "max_completion_tokens": integer_field("Tokens generated at most per choice (default: up to max_model_len).",
                                      minimum=1),
    "max_tokens": integer_field("The older name of max_completion_tokens, which wins when both are given.", minimum=1),
    "logprobs": boolean_field("The chosen tokens' logprobs.", default=False),
    "top_logprobs": integer_field("With logprobs: this many most likely alternatives per token.",
                             minimum=0, maximum=MAX_LOGPROBS),
    "tools": _TOOLS,
    "tool_choice": _TOOL_CHOICE,
    "parallel_tool_calls": boolean_field("With tool_choice required: false allows one call only.", default=True),
    "functions": not_implemented([], "the deprecated functions (use tools)"),
    "chat_template_kwargs": {"type": "object", "description": (
        "vLLM's: more variables for the model's chat template, e.g. {\"enable_thinking\": false} for Qwen3. "
        "The ones the server sets (messages, tools, add_generation_prompt, bos_token, eos_token) are refused.")},
    **COMMON_FIELDS,
}
CHAT_REQUIRED = ("messages",)
# Variables the server gives the chat template itself: chat_template_kwargs may not replace them.
RESERVED_TEMPLATE_KWARGS = ("messages", "tools", "add_generation_prompt", "bos_token", "eos_token")


# -- requests -----------------------------------------------------------------------------------

@dataclass(slots=True)
class GenerationRequest:
    """A checked /v1/completions or /v1/chat/completions body."""

    model: str | None
    params: SamplingParams
    stream: bool
    include_usage: bool
    max_tokens_param: str  # the name the client used, for error messages
    prompts: list | None = None  # completions: strings or token-id lists
    echo: bool = False  # completions: each choice's text and logprobs start with the prompt's
    echo_only: bool = False  # completions with echo and max_tokens 0: the prompt alone (one token is computed)
    prompt_logprobs: int | None = None  # vLLM's field as given (echo may ask the engine for them too)
    suffix: str | None = None  # completions: fill in the middle between each prompt and this
    messages: list[dict] | None = None  # chat: checked messages, content as text
    cache_salt: str | None = None  # vLLM's: only requests with the same salt share prefix-cache pages
    structured_outputs_param: str | None = None  # the field that gave params.structured_outputs
    tools: tool_calls_.ToolRequest | None = None  # chat: the tools and tool choice
    chat_template_kwargs: dict = field(default_factory=dict)  # chat: more variables for the template


def parse_completion_request(body: dict, defaults: dict | None = None) -> GenerationRequest:
    """`defaults`: the model's own sampling defaults for the fields the body leaves out."""
    fields = COMPLETION_FIELDS
    refuse_not_implemented(body, fields)
    prompts = _prompts(body.get("prompt"))
    constraint, constraint_param = _structured_outputs(body)
    echo = read_field(body, fields, "echo", False)
    suffix = read_field(body, fields, "suffix") or None  # "" asks for nothing
    if suffix is not None and echo:
        raise APIError(400, "'suffix' (fill in the middle) cannot be combined with 'echo'", param="suffix")
    max_tokens = read_field(body, fields, "max_tokens", 16)
    if max_tokens == 0 and not echo:
        raise APIError(400, "'max_tokens' 0 is only allowed with 'echo': true (the prompt alone)", param="max_tokens")
    logprobs = read_field(body, fields, "logprobs")
    # max_tokens 0: the engine computes one token, which the answer leaves out
    params = _sampling_params(body, fields, max_tokens=max_tokens or 1, max_tokens_param="max_tokens",
                              logprobs=logprobs, logprobs_param="logprobs", structured_outputs=constraint,
                              defaults=defaults)
    if echo and logprobs is not None:  # the prompt's logprobs, with as many alternatives as the output's
        params = dataclasses.replace(params, prompt_logprobs=max(params.prompt_logprobs or 0, logprobs))
    best_of = read_field(body, fields, "best_of")
    if best_of is not None and best_of != params.n:
        raise APIError(400, f"'best_of' ({best_of}) other than n ({params.n}) is not supported", param="best_of")
    return GenerationRequest(read_field(body, fields, "model"), params, *_stream(body, fields), "max_tokens",
                             prompts=prompts, echo=echo, echo_only=max_tokens == 0, suffix=suffix,
                             prompt_logprobs=read_field(body, fields, "prompt_logprobs"),
                             cache_salt=read_field(body, fields, "cache_salt"),
                             structured_outputs_param=constraint_param)


def parse_chat_request(body: dict, defaults: dict | None = None) -> GenerationRequest:
    """`defaults`: the model's own sampling defaults for the fields the body leaves out."""
    fields = CHAT_FIELDS
    refuse_not_implemented(body, fields)
    messages = _messages(body.get("messages"))
    tools = tool_calls_.check_tools(body["tools"]) if body.get("tools") is not None else []
    tool_request = tool_calls_.check_tool_choice(body.get("tool_choice"), tools)
    tool_request.parallel = read_field(body, fields, "parallel_tool_calls", True)
    top_logprobs = read_field(body, fields, "top_logprobs")
    logprobs = read_field(body, fields, "logprobs", False)
    if top_logprobs is not None and not logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    read_field(body, fields, "max_tokens")  # checked even when max_completion_tokens, OpenAI's newer name, wins
    max_param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    constraint, constraint_param = _structured_outputs(body)
    params = _sampling_params(body, fields, max_tokens=read_field(body, fields, max_param), max_tokens_param=max_param,
                              logprobs=(top_logprobs or 0) if logprobs else None,
                              logprobs_param="top_logprobs", structured_outputs=constraint, defaults=defaults)
    return GenerationRequest(read_field(body, fields, "model"), params, *_stream(body, fields), max_param,
                             messages=messages, cache_salt=read_field(body, fields, "cache_salt"),
                             prompt_logprobs=read_field(body, fields, "prompt_logprobs"),
                             structured_outputs_param=constraint_param, tools=tool_request,
                             chat_template_kwargs=chat_template_kwargs(body))


def chat_template_kwargs(body: dict) -> dict:
    """A request's `chat_template_kwargs` (vLLM's): an object of template variables, none of them one
    the server sets (`RESERVED_TEMPLATE_KWARGS`)."""
    name = "chat_template_kwargs"
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad(name, "an object", value)
    reserved = [key for key in RESERVED_TEMPLATE_KWARGS if key in value]
    if reserved:
        raise APIError(400, f"'{name}' may not set {', '.join(reserved)}: the server gives the template those",
                       param=name)
    return dict(value)


def _stream(body: dict, fields: dict) -> tuple[bool, bool]:
    stream = read_field(body, fields, "stream", False)
    if stream and body.get("prompt_logprobs") is not None:  # as vLLM
        raise APIError(400, "'prompt_logprobs' is not available with 'stream': true", param="prompt_logprobs")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise APIError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")
    if not isinstance(options, dict):
        raise bad("stream_options", "an object", options)
    return stream, read_field(options, STREAM_OPTIONS_FIELDS, "include_usage", False)


def _prompts(prompt) -> list:
    """A string, a list of strings, a list of token ids, or a list of token-id lists."""
    expected = "a string, a list of strings, a list of token ids or a list of token-id lists"
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt):
        prompts = [[int(t) for t in prompt]]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = prompt
    elif (isinstance(prompt, list) and prompt
          and all(isinstance(p, list) and p and all(is_int(t) for t in p) for p in prompt)):
        prompts = [[int(t) for t in p] for p in prompt]
    elif prompt is None:
        raise APIError(400, "'prompt' is required", param="prompt")
    else:
        raise bad("prompt", expected, prompt)
    if len(prompts) > MAX_PROMPTS:
        raise APIError(400, f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", param="prompt")
    return prompts


def _messages(messages) -> list[dict]:
    """Checked messages with `content` as text (text parts joined by newlines)."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of messages", param="messages")
    checked = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(where, "an object with 'role' and 'content'", message)
        role = message.get("role")
        if not (isinstance(role, str) and role in CHAT_ROLES):
            raise APIError(400, f"{where}.role must be one of {', '.join(CHAT_ROLES)}, got {short_repr(role)}",
                           param=f"{where}.role")
        tool_calls = message.get("tool_calls") if role == "assistant" else None
        content = message.get("content")
        if content is None and role == "assistant":
            content = ""
        elif isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"{where}.content: only text parts ({{'type': 'text', 'text': ...}}) are "
                               "supported", param=f"{where}.content")
            content = "\n".join(p["text"] for p in content)
        elif not isinstance(content, str):
            raise bad(f"{where}.content", "a string or a list of text parts", content)
        checked.append({"role": "system" if role == "developer" else role, "content": content})
        if tool_calls is not None:
            calls = tool_calls_.template_message_tool_calls(tool_calls, f"{where}.tool_calls")
            if calls:
                checked[-1]["tool_calls"] = calls
        if role == "tool":
            call_id = message.get("tool_call_id")
            if call_id is not None and not isinstance(call_id, str):
                raise bad(f"{where}.tool_call_id", "a string", call_id)
            checked[-1]["tool_call_id"] = call_id
    return checked


_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def _structured_outputs(body: dict) -> tuple[StructuredOutputsParams | None, str | None]:
    """The request's constraint on its text and the field that gave it: OpenAI's response_format,
    vLLM's structured_outputs, or one of vLLM's older guided_* fields; at most one of them."""
    response_format = body.get("response_format")
    is_text = isinstance(response_format, dict) and response_format.get("type") == "text"
    given = [name for name in ("response_format", "structured_outputs", *_GUIDED) if body.get(name) is not None
             and not (name == "response_format" and is_text)]
    if not given:
        return None, None
    if len(given) > 1:
        raise APIError(400, f"at most one constraint per request: got {', '.join(given)}", param=given[1])
    name = given[0]
    value = body[name]
    if name == "response_format":
        fields = _response_format(value)
    elif name == "structured_outputs":
        if not isinstance(value, dict):
            raise bad(name, "an object", value)
        unknown = sorted(set(value) - set(STRUCTURED_OUTPUTS_FIELDS))
        if unknown:
            raise APIError(400, f"'{name}' supports only {', '.join(STRUCTURED_OUTPUTS_FIELDS)}; got "
                           f"{short_repr(unknown)}", param=name)
        fields = {key: v for key, v in value.items() if v is not None}
    else:
        fields = {_GUIDED[name]: value}
    try:
        return StructuredOutputsParams(**fields), name
    except ValueError as e:
        raise APIError(400, f"'{name}': {e}", param=name) from None


def _response_format(value) -> dict:
    """OpenAI's response_format (but type text, no constraint) as StructuredOutputsParams fields."""
    name = "response_format"
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "json_object":
        return {"json_object": True}
    if kind != "json_schema":
        raise bad(name, "an object with type text, json_object or json_schema", value)
    spec = value.get("json_schema")
    if not (isinstance(spec, dict) and isinstance(spec.get("name"), str) and isinstance(spec.get("schema"), dict)
            and isinstance(spec.get("description", ""), str)
            and isinstance(spec.get("strict", False), (bool, type(None)))):
        raise APIError(400, "'response_format.json_schema' must be an object with a 'name' (a string), a 'schema' "
                       f"(an object) and optionally 'description' and 'strict', got {short_repr(spec)}", param=name)
    return {"json": spec["schema"]}


def _sampling_params(body: dict, fields: dict, *, max_tokens, max_tokens_param: str, logprobs,
                     logprobs_param: str, structured_outputs: StructuredOutputsParams | None,
                     defaults: dict | None = None) -> SamplingParams:
    read = functools.partial(read_field, body, fields)
    base = SamplingParams()  # what a field left out gets: the model's default, else SamplingParams'
    model = {name: getattr(base, name) for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")}
    model |= defaults or {}
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise bad("stop", "a non-empty string or a list of them", stop)
    if stop is not None and len(stop) > MAX_STOP:
        raise APIError(400, f"at most {MAX_STOP} stop strings, got {len(stop)}", param="stop")
    stop_token_ids = body.get("stop_token_ids")
    if stop_token_ids is None:
        stop_token_ids = []
    if not (isinstance(stop_token_ids, list) and all(is_int(t) for t in stop_token_ids)):
        raise bad("stop_token_ids", "a list of token ids", stop_token_ids)
    stop_token_ids = [int(t) for t in stop_token_ids]
    seed = read("seed")
    values = dict(
        n=read("n", 1),
        temperature=read("temperature", model["temperature"]),
        top_p=read("top_p", model["top_p"]),
        top_k=min(read("top_k", model["top_k"]), MAX_TOP_K),
        min_p=read("min_p", model["min_p"]),
        presence_penalty=read("presence_penalty", 0.0),
        frequency_penalty=read("frequency_penalty", 0.0),
        repetition_penalty=read("repetition_penalty", model["repetition_penalty"]),
        logprobs=logprobs,
        prompt_logprobs=read("prompt_logprobs"),
        max_tokens=max_tokens,
        min_tokens=read("min_tokens", 0),
        stop=stop,
        stop_token_ids=stop_token_ids,
        ignore_eos=read("ignore_eos", False),
        seed=seed % SEED_RANGE if seed is not None else None,
        skip_special_tokens=read("skip_special_tokens", True),
        structured_outputs=structured_outputs,
        logit_bias=_logit_bias(body.get("logit_bias")),
    )
    try:
        return SamplingParams(**values)
    except ValueError as e:
        # "SamplingParams.<field> must be ...": answer in the client's names.
        message = str(e)
        field = message.removeprefix("SamplingParams.").split(" ", 1)[0]
        param = {"max_tokens": max_tokens_param, "logprobs": logprobs_param}.get(field, field)
        raise APIError(400, f"'{param}' " + message.split(" ", 1)[1], param=param) from None


def _logit_bias(value) -> dict[int, float] | None:
    """OpenAI's logit_bias: an object of token ids, spelled as decimal strings, to numbers in [-100, 100]."""
    if value is None:
        return None
    expected = f"an object of at most {MAX_LOGIT_BIAS} token ids (as strings) to numbers in [-100, 100]"
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise bad("logit_bias", expected, value)
    biases = {}
    for token, bias in value.items():
        if not (token.isascii() and token.isdigit() and is_number(bias) and -MAX_BIAS <= bias <= MAX_BIAS):
            raise bad("logit_bias", expected, value)
        biases[int(token)] = float(bias)
    return biases or None
