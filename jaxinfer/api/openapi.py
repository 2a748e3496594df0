"""The app's OpenAPI 3.1 description, served at /openapi.json as vLLM serves its own.

The request bodies are protocol.py's field tables, the ones the readers check requests against, so
the description cannot drift from what is accepted. Every route the app serves needs an entry in
OPERATIONS: `openapi_document` fails at app creation for one that has none. The chat page's static
files (a Mount, not a Route) are not part of the API and not described.
"""

from importlib.metadata import PackageNotFoundError, version

from starlette.routing import Route

from jaxinfer.api.openai_responses import RESPONSES_FIELDS, RESPONSES_REQUIRED
from jaxinfer.api.anthropic import MESSAGES_REQUEST
from jaxinfer.api.fields import nullable
from jaxinfer.api.protocol import CHAT_FIELDS, CHAT_REQUIRED, COMPLETION_FIELDS, COMPLETION_REQUIRED, ERROR_TYPES


def request_schema(fields: dict, required: tuple[str, ...], description: str) -> dict:
    """An object of `fields`; the optional ones accept null ("not given"), unknown ones are ignored."""
    return {"type": "object", "description": description, "required": list(required),
            "properties": {name: schema if name in required else nullable(schema) for name, schema in fields.items()}}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _list_of(items: dict) -> dict:
    return {"type": "array", "items": items}


def _object(required: list[str], properties: dict, **extra) -> dict:
    return {"type": "object", "required": required, "properties": properties, **extra}


_INT, _STR, _NUMBER = {"type": "integer"}, {"type": "string"}, {"type": "number"}
_FINISH_REASON = {"enum": ["stop", "length", "abort", None], "description": "null until the choice ends"}

SCHEMAS = {
    "CompletionRequest": request_schema(COMPLETION_FIELDS, COMPLETION_REQUIRED, "POST /v1/completions"),
    "ChatCompletionRequest": request_schema(CHAT_FIELDS, CHAT_REQUIRED, "POST /v1/chat/completions"),
    "ResponseRequest": request_schema(RESPONSES_FIELDS, RESPONSES_REQUIRED, "POST /v1/responses"),
    "Response": {"type": "object", "description": "OpenAI's Response object (status, output items, usage); "
                                                  "the stream's events: OpenAI's Responses streaming events."},
    "Usage": _object(["prompt_tokens", "completion_tokens", "total_tokens"],
                     {"prompt_tokens": _INT, "completion_tokens": _INT, "total_tokens": _INT}),
    "CompletionLogprobs": _object(
        ["tokens", "token_logprobs", "top_logprobs", "text_offset"],
        {"tokens": _list_of(_STR), "token_logprobs": _list_of(_NUMBER),
         "top_logprobs": _list_of({"type": "object", "additionalProperties": _NUMBER}), "text_offset": _list_of(_INT)}),
    "ChatTokenLogprob": _object(["token", "logprob", "bytes"], {"token": _STR, "logprob": _NUMBER,
                                                               "bytes": _list_of(_INT)}),
    "ChatLogprobsContent": _object(["token", "logprob", "bytes", "top_logprobs"], {
        "token": _STR, "logprob": _NUMBER, "bytes": _list_of(_INT),
        "top_logprobs": _list_of(_ref("ChatTokenLogprob"))}),
    "Completion": _object(
        ["id", "object", "created", "model", "choices", "usage"],
        {"id": _STR, "object": {"const": "text_completion"}, "created": _INT, "model": _STR,
         "choices": _list_of(_object(["index", "text", "logprobs", "finish_reason"], {
             "index": {"type": "integer", "description": "prompt * n + i"}, "text": _STR,
             "logprobs": nullable(_ref("CompletionLogprobs")), "finish_reason": _FINISH_REASON})),
         "usage": _ref("Usage")}),
    "ChatCompletion": _object(
        ["id", "object", "created", "model", "choices", "usage"],
        {"id": _STR, "object": {"const": "chat.completion"}, "created": _INT, "model": _STR,
         "choices": _list_of(_object(["index", "message", "logprobs", "finish_reason"], {
             "index": _INT,
             "message": _object(["role", "content"], {"role": {"const": "assistant"}, "content": _STR}),
             "logprobs": nullable(_object(["content"], {"content": _list_of(_ref("ChatLogprobsContent"))})),
             "finish_reason": _FINISH_REASON})),
         "usage": _ref("Usage")}),
    "ModelList": _object(["object", "data"], {"object": {"const": "list"}, "data": _list_of(_object(
        ["id", "object", "created", "owned_by"],
        {"id": _STR, "object": {"const": "model"}, "created": _INT, "owned_by": _STR, "root": _STR,
         "max_model_len": _INT}))}),
    "Error": _object(["error"], {"error": _object(["message", "type", "param", "code"], {
        "message": _STR, "type": {"enum": sorted(set(ERROR_TYPES.values()))},
        "param": nullable(_STR), "code": nullable(_STR)})}),
    "Health": _object(["status"], {"status": {"enum": ["ok", "draining", "unhealthy"]}, "error": _STR}),
}

_STREAM = {"type": "string", "description": "Server-sent events (with stream: true): `data: <chunk>` lines, "
                                            "then `data: [DONE]`."}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict:
    reasons = {400: "The request is invalid; `param` names the field.", 401: "Missing or wrong API key.",
               404: "No such model.", 413: "The body is larger than the server's limit.",
               503: "The server is overloaded (Retry-After) or its engine has failed."}
    return {str(s): _json(_ref("Error"), reasons[s]) for s in statuses}


def _generate(summary: str, request: str, response: str) -> dict:
    return {"summary": summary,
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
            "responses": {"200": {"description": "The whole answer, or a stream of chunks.", "content": {
                "application/json": {"schema": _ref(response)}, "text/event-stream": {"schema": _STREAM}}},
                          **_errors(400, 401, 404, 413, 503)}}


_BOOLEAN = nullable({"type": "boolean"})
_TOKENIZE = {"type": "object", "oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}], "properties": {
    "model": nullable(_STR), "prompt": _STR, "messages": CHAT_FIELDS["messages"], "add_special_tokens": _BOOLEAN,
    "add_generation_prompt": _BOOLEAN, "return_token_strs": _BOOLEAN,
    "chat_template_kwargs": CHAT_FIELDS["chat_template_kwargs"]}}

OPERATIONS = {
    "/v1/completions": {"post": _generate("OpenAI's completions", "CompletionRequest", "Completion")},
    "/v1/chat/completions": {"post": _generate("OpenAI's chat completions (the model's chat template)",
                                               "ChatCompletionRequest", "ChatCompletion")},
    "/v1/responses": {"post": _generate("OpenAI's Responses API, stateless (the model's chat template)",
                                        "ResponseRequest", "Response")},
    "/v1/messages": {"post": {
        "summary": "Anthropic's Messages API (text, tool_use and tool_result blocks; the model's chat template)",
        "requestBody": {"required": True, "content": {"application/json": {"schema": MESSAGES_REQUEST}}},
        "responses": {"200": {"description": "The message, or Anthropic's server-sent events.", "content": {
            "application/json": {"schema": {"type": "object"}}, "text/event-stream": {"schema": _STR}}},
            "4XX": _json({"type": "object"}, "Anthropic's error: {type: error, error: {type, message}}."),
            "5XX": _json({"type": "object"}, "Anthropic's error (529: overloaded).")}}},
    "/tokenize": {"post": {"summary": "vLLM's: a prompt or messages as token ids", "requestBody": {
        "required": True, "content": {"application/json": {"schema": _TOKENIZE}}}, "responses": {
        "200": _json(_object(["count", "max_model_len", "tokens"], {
            "count": _INT, "max_model_len": _INT, "tokens": _list_of(_INT), "token_strs": _list_of(_STR)}),
            "The token ids."), **_errors(400, 404, 413)}}},
    "/detokenize": {"post": {"summary": "vLLM's: token ids as text", "requestBody": {
        "required": True, "content": {"application/json": {"schema": _object(["tokens"], {
            "model": nullable(_STR), "tokens": _list_of(_INT)})}}}, "responses": {
        "200": _json(_object(["prompt"], {"prompt": _STR}), "The text."), **_errors(400, 404, 413)}}},
    "/v1/models": {"get": {"summary": "The served model", "responses": {
        "200": _json(_ref("ModelList"), "The one model this server serves."), **_errors(401)}}},
    "/health": {"get": {"summary": "Whether the engine runs and admits requests", "responses": {
        "200": _json(_ref("Health"), "Running."), "503": _json(_ref("Health"), "Failed, or draining.")}}},
    "/metrics": {"get": {"summary": "Prometheus metrics (vLLM's names, prefix jaxinfer:)", "responses": {
        "200": {"description": "The Prometheus text format.", "content": {"text/plain": {"schema": _STR}}}}}},
    "/openapi.json": {"get": {"summary": "This description", "responses": {
        "200": _json({"type": "object"}, "OpenAPI 3.1.")}}},
    "/": {"get": {"summary": "The chat page (not with --disable-frontend)", "responses": {
        "200": {"description": "HTML.", "content": {"text/html": {"schema": _STR}}}}}},
}


def openapi_document(routes, *, api_key: bool) -> dict:
    """The description of `routes` (Starlette Routes); with an API key, the /v1 routes need it."""
    paths = {}
    for route in routes:
        if not isinstance(route, Route):
            continue
        for method in sorted(route.methods - {"HEAD"}):  # Starlette answers HEAD wherever it answers GET
            operation = OPERATIONS.get(route.path, {}).get(method.lower())
            if operation is None:
                raise KeyError(f"{method} {route.path} has no entry in jaxinfer.api.openapi.OPERATIONS")
            if api_key and route.path.startswith("/v1/"):
                operation = {**operation, "security": [{"bearer": []}]}
            paths.setdefault(route.path, {})[method.lower()] = operation
    components = {"schemas": SCHEMAS}
    if api_key:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return {"openapi": "3.1.0", "info": {"title": "jaxinfer", "version": _version(),
                                         "description": "An OpenAI-compatible server on jaxinfer."},
            "paths": paths, "components": components}


def _version() -> str:
    try:
        return version("jaxinfer")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "0+unknown"
