"""The OpenAI protocol: request bodies checked and turned into SamplingParams, responses and
streaming chunks built in OpenAI's shapes, errors as OpenAI's `{"error": {...}}`.

Requests are plain JSON dicts checked field by field: a wrong type or value is an `APIError` (400)
that names the field in `param`. Fields that OpenAI or vLLM define and we do not implement are
refused with a message that says so, rather than silently ignored; unknown fields are ignored.
"""

import math
from dataclasses import dataclass

from jaxinfer.sampling import SamplingParams

MAX_N = 16  # choices per request
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_STOP = 16  # stop strings per request
CHAT_ROLES = ("system", "developer", "user", "assistant")
# The engine keeps seeds (seed + i for choice i) and top_k in int32 arrays.
SEED_RANGE = 2**31 - MAX_N  # seeds are reduced into [0, SEED_RANGE)
MAX_TOP_K = 2**30  # larger is the same as no limit: top_k is clamped to it

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error",
               503: "server_error"}


class APIError(Exception):
    """An error answered as OpenAI's `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


# -- field readers ------------------------------------------------------------------------------

def _bad(name: str, expected: str, value) -> APIError:
    return APIError(400, f"'{name}' must be {expected}, got {value!r:.100}", param=name)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _int(body: dict, name: str, default=None):
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise _bad(name, "an integer", value)
    return value


def _number(body: dict, name: str, default=None):
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value) or not math.isfinite(value):
        raise _bad(name, "a finite number", value)
    return float(value)


def _cache_salt(body: dict) -> str | None:
    value = body.get("cache_salt")
    if value is not None and not (isinstance(value, str) and value):
        raise _bad("cache_salt", "a non-empty string", value)
    return value


def _bool(body: dict, name: str, default=False):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(name, "a boolean", value)
    return value


def _refuse(body: dict, name: str, unless, why: str) -> None:
    value = body.get(name)
    if value is not None and not unless(value):
        raise APIError(400, f"'{name}' is not supported: {why}", param=name)


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
    messages: list[dict] | None = None  # chat: checked messages, content as text
    cache_salt: str | None = None  # vLLM's: only requests with the same salt share prefix-cache pages


def parse_completion_request(body: dict) -> GenerationRequest:
    _refuse(body, "echo", lambda v: v is False, "echo is not implemented")
    _refuse(body, "suffix", lambda v: v == "", "suffix (insertion) is not implemented")
    prompts = _prompts(body.get("prompt"))
    logprobs = _int(body, "logprobs")
    params = _sampling_params(body, max_tokens=_int(body, "max_tokens", 16), max_tokens_param="max_tokens",
                              logprobs=logprobs, logprobs_param="logprobs")
    best_of = _int(body, "best_of")
    if best_of is not None and best_of != params.n:
        raise APIError(400, f"'best_of' ({best_of}) other than n ({params.n}) is not supported", param="best_of")
    return GenerationRequest(_model(body), params, *_stream(body), "max_tokens", prompts=prompts,
                             cache_salt=_cache_salt(body))


def parse_chat_request(body: dict) -> GenerationRequest:
    _refuse(body, "tools", lambda v: v == [], "tool calling is not implemented")
    _refuse(body, "functions", lambda v: v == [], "function calling is not implemented")
    _refuse(body, "tool_choice", lambda v: v == "none", "tool calling is not implemented")
    _refuse(body, "response_format", lambda v: isinstance(v, dict) and v.get("type") == "text",
            "structured output is not implemented")
    messages = _messages(body.get("messages"))
    top_logprobs = _int(body, "top_logprobs")
    logprobs = _bool(body, "logprobs")
    if top_logprobs is not None and not logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    max_param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    params = _sampling_params(body, max_tokens=_int(body, max_param), max_tokens_param=max_param,
                              logprobs=(top_logprobs or 0) if logprobs else None, logprobs_param="top_logprobs")
    return GenerationRequest(_model(body), params, *_stream(body), max_param, messages=messages,
                             cache_salt=_cache_salt(body))


def _model(body: dict) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", "a string", model)
    return model


def _stream(body: dict) -> tuple[bool, bool]:
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise APIError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")
    if not isinstance(options, dict):
        raise _bad("stream_options", "an object", options)
    return stream, _bool(options, "include_usage")


def _prompts(prompt) -> list:
    """A string, a list of strings, a list of token ids, or a list of token-id lists."""
    expected = "a string, a list of strings, a list of token ids or a list of token-id lists"
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = prompt
    elif (isinstance(prompt, list) and prompt
          and all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt)):
        prompts = prompt
    elif prompt is None:
        raise APIError(400, "'prompt' is required", param="prompt")
    else:
        raise _bad("prompt", expected, prompt)
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
            raise _bad(where, "an object with 'role' and 'content'", message)
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise APIError(400, f"{where}.role must be one of {', '.join(CHAT_ROLES)}, got {role!r:.50}",
                           param=f"{where}.role")
        if message.get("tool_calls"):
            raise APIError(400, "tool calls are not implemented", param=f"{where}.tool_calls")
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
            raise _bad(f"{where}.content", "a string or a list of text parts", content)
        checked.append({"role": "system" if role == "developer" else role, "content": content})
    return checked


def _sampling_params(body: dict, *, max_tokens, max_tokens_param: str, logprobs, logprobs_param: str
                     ) -> SamplingParams:
    _refuse(body, "logit_bias", lambda v: v == {}, "logit_bias is not implemented")
    _refuse(body, "min_tokens", lambda v: v == 0, "min_tokens is not implemented")
    n = _int(body, "n", 1)
    if n > MAX_N:
        raise APIError(400, f"'n' must be at most {MAX_N}, got {n}", param="n")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise _bad("stop", "a non-empty string or a list of them", stop)
    if stop is not None and len(stop) > MAX_STOP:
        raise APIError(400, f"at most {MAX_STOP} stop strings, got {len(stop)}", param="stop")
    stop_token_ids = body.get("stop_token_ids") or []
    if not (isinstance(stop_token_ids, list) and all(_is_int(t) for t in stop_token_ids)):
        raise _bad("stop_token_ids", "a list of token ids", stop_token_ids)
    seed = _int(body, "seed")
    fields = dict(
        n=n,
        temperature=_number(body, "temperature", 1.0),
        top_p=_number(body, "top_p", 1.0),
        top_k=min(_int(body, "top_k", -1), MAX_TOP_K),
        min_p=_number(body, "min_p", 0.0),
        presence_penalty=_number(body, "presence_penalty", 0.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0),
        logprobs=logprobs,
        max_tokens=max_tokens,
        stop=stop,
        stop_token_ids=stop_token_ids,
        ignore_eos=_bool(body, "ignore_eos"),
        seed=seed % SEED_RANGE if seed is not None else None,
        skip_special_tokens=_bool(body, "skip_special_tokens", True),
    )
    try:
        return SamplingParams(**fields)
    except ValueError as e:
        # "SamplingParams.<field> must be ...": answer in the client's names.
        message = str(e)
        field = message.removeprefix("SamplingParams.").split(" ", 1)[0]
        param = {"max_tokens": max_tokens_param, "logprobs": logprobs_param}.get(field, field)
        raise APIError(400, f"'{param}' " + message.split(" ", 1)[1], param=param) from None


# -- responses ----------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(entries, token_text, text_offset: int = 0) -> dict:
    """The legacy completions shape: parallel lists over tokens."""
    tokens, offsets = [], []
    for entry in entries:
        tokens.append(token_text(entry.token_id))
        offsets.append(text_offset)
        text_offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{token_text(t): lp for t, lp in e.top} for e in entries], "text_offset": offsets}


def chat_logprobs(entries, token_text) -> dict:
    def item(token_id, logprob):
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}


def completion_response(request_id: str, created: int, model: str, choices: list[dict], usage_: dict) -> dict:
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage_}


def completion_choice(index: int, text: str, finish_reason, logprobs=None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_response(request_id: str, created: int, model: str, choices: list[dict], usage_: dict) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage_}


def chat_choice(index: int, text: str, finish_reason, logprobs=None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def completion_chunk(request_id: str, created: int, model: str, choices: list[dict], usage_=None) -> dict:
    chunk = {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk


def chat_chunk(request_id: str, created: int, model: str, choices: list[dict], usage_=None) -> dict:
    chunk = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": choices}
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk


def chat_chunk_choice(index: int, delta: dict, finish_reason=None, logprobs=None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def model_card(name: str, created: int, max_model_len: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "jaxinfer", "root": name,
            "max_model_len": max_model_len}

