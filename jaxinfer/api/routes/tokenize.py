"""POST /tokenize and /detokenize, in vLLM's shapes: a prompt, or messages rendered with the model's
chat template, as the token ids the engine would see; token ids back as text. Not under /v1, so (as
in vLLM) no API key is asked for.
"""

import asyncio

import jinja2
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from jaxinfer.api import protocol, tool_calls
from jaxinfer.api.errors import APIError, short_repr


async def tokenize(request: Request) -> Response:
    """{prompt, add_special_tokens=true} or {messages, add_generation_prompt=true, add_special_tokens=false,
    tools?, chat_template_kwargs?}, with return_token_strs=false -> {count, max_model_len, tokens, token_strs if asked for}."""
    server = request.app.state.server
    body = await server.read_json(request)
    server.check_model(_optional(body, "model", str))
    return_token_strs = _optional(body, "return_token_strs", bool, False)
    add_generation_prompt = _optional(body, "add_generation_prompt", bool, True)  # checked even with a prompt
    if ("prompt" in body) == ("messages" in body):
        raise APIError(400, "give either 'prompt' or 'messages'")
    tokenizer = server.tokenizer
    if "prompt" in body:
        prompt = body["prompt"]
        if not isinstance(prompt, str):
            raise APIError(400, f"'prompt' must be a string, got {short_repr(prompt)}", param="prompt")
        add_special_tokens = _optional(body, "add_special_tokens", bool, True)
        tokens = await asyncio.to_thread(tokenizer.encode, prompt, add_special_tokens)
    else:
        # The chat route's own checks of messages and tools.
        messages = protocol.parse_chat_request({"messages": body["messages"]}).messages
        tools = tool_calls.check_tools(body["tools"]) if body.get("tools") is not None else None
        template_kwargs = protocol.chat_template_kwargs(body)
        add_special_tokens = _optional(body, "add_special_tokens", bool, False)
        try:
            text = await asyncio.to_thread(tokenizer.apply_chat_template, messages, add_generation_prompt,
                                           tools=tools, **template_kwargs)
        except (jinja2.TemplateError, ValueError, TypeError) as e:
            raise APIError(400, f"the chat template refused these messages: {e}",
                           param="chat_template_kwargs" if template_kwargs else "messages") from None
        tokens = await asyncio.to_thread(tokenizer.encode, text, add_special_tokens)
    answer = {"count": len(tokens), "max_model_len": server.max_model_len, "tokens": tokens}
    if return_token_strs:
        answer["token_strs"] = [tokenizer.backend.id_to_token(t) for t in tokens]
    return JSONResponse(answer)


async def detokenize(request: Request) -> Response:
    """{tokens} -> {prompt}: the text of the token ids, special tokens included."""
    server = request.app.state.server
    body = await server.read_json(request)
    server.check_model(_optional(body, "model", str))
    tokens = body.get("tokens")
    if not (isinstance(tokens, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in tokens)):
        raise APIError(400, f"'tokens' must be a list of token ids, got {short_repr(tokens)}", param="tokens")
    if not all(0 <= t < server.vocab_size for t in tokens):
        raise APIError(400, f"token ids must be in [0, {server.vocab_size})", param="tokens")
    text = await asyncio.to_thread(server.tokenizer.decode, tokens, False)
    return JSONResponse({"prompt": text})


def _optional(body: dict, name: str, kind: type, default=None):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise APIError(400, f"'{name}' must be a {'boolean' if kind is bool else 'string'}, got {short_repr(value)}",
                       param=name)
    return value
