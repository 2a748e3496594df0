"""POST /v1/completions and /v1/chat/completions: one request in, whole or as server-sent events.

A completions request with several prompts becomes one engine request per prompt (choice index =
prompt * n + i). A client that goes away (mid-stream, or while waiting for a whole answer) aborts
its engine requests, which frees their KV pages.
"""

import asyncio
import functools
import json
import time
import uuid

import jinja2
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from jaxinfer.api import protocol, responses
from jaxinfer.api.protocol import APIError, GenerationRequest
from jaxinfer.api.routes.generation import (EventStreamResponse, abort_unfinished, merge, submit,
                                            unless_disconnected)
from jaxinfer.async_engine import EngineDeadError


async def create_completion(request: Request) -> Response:
    server = request.app.state.server
    server.authorize(request)
    req = protocol.parse_completion_request(await server.read_json(request))
    server.check_model(req.model)
    prompt_ids = []
    for prompt in req.prompts:
        if isinstance(prompt, list) and not all(0 <= t < server.vocab_size for t in prompt):
            raise APIError(400, f"prompt token ids must be in [0, {server.vocab_size})", param="prompt")
        # Off the event loop: a long prompt takes a while to tokenize.
        prompt_ids.append(await asyncio.to_thread(server.tokenizer.encode, prompt) if isinstance(prompt, str)
                          else prompt)
    return await _generate(request, server, req, prompt_ids, "prompt", chat=False)


async def create_chat_completion(request: Request) -> Response:
    server = request.app.state.server
    server.authorize(request)
    req = protocol.parse_chat_request(await server.read_json(request))
    server.check_model(req.model)
    try:
        prompt_ids = await asyncio.to_thread(server.tokenizer.encode_chat, req.messages)
    except (jinja2.TemplateError, ValueError) as e:
        raise APIError(400, f"the chat template refused these messages: {e}", param="messages") from None
    return await _generate(request, server, req, [prompt_ids], "messages", chat=True)


async def _generate(request, server, req: GenerationRequest, prompt_ids: list[list[int]], prompt_param: str,
                    chat: bool) -> Response:
    max_len = server.max_model_len
    for ids in prompt_ids:
        if not ids:
            raise APIError(400, "the prompt is empty", param=prompt_param)
        if len(ids) >= max_len:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this model's maximum context length "
                           f"(max_model_len) is {max_len}", param=prompt_param)
        if req.params.max_tokens is not None and len(ids) + req.params.max_tokens > max_len:
            raise APIError(400, f"the prompt ({len(ids)} tokens) plus {req.max_tokens_param} "
                           f"({req.params.max_tokens}) exceeds max_model_len ({max_len})",
                           param=req.max_tokens_param)
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    streams = await submit(server.engine, req.params, prompt_ids, request_id, cache_salt=req.cache_salt,
                           constraint_param=req.structured_outputs_param)
    reply = _Reply(server, req, request_id, prompt_ids, chat)
    abort_unfinished = functools.partial(abort_unfinished, streams, server.engine.abort)
    if req.stream:
        return EventStreamResponse(reply.events(streams), abort_unfinished, media_type="text/event-stream",
                                    headers={"Cache-Control": "no-cache"})
    try:
        finals = await unless_disconnected(request, reply.collect(streams))
    except EngineDeadError as e:
        raise APIError(503, str(e), code="engine_dead") from None
    finally:
        abort_unfinished()
    if finals is None:
        return Response(status_code=499)  # the client is gone; nobody reads this
    return JSONResponse(reply.response(finals))


class _Reply:
    """Turns engine outputs into one OpenAI response or a sequence of chunks."""

    def __init__(self, server, req: GenerationRequest, request_id: str, prompt_ids, chat: bool):
        self.server, self.req, self.request_id, self.prompt_ids, self.chat = server, req, request_id, prompt_ids, chat
        self.created = int(time.time())
        self.n = req.params.n

    def token_text(self, token_id: int) -> str:
        return self.server.tokenizer.decode([token_id], skip_special_tokens=False)

    def logprobs(self, entries, text_offset: int = 0):
        if entries is None or self.req.params.logprobs is None:
            return None
        if self.chat:
            return responses.chat_logprobs(entries, self.token_text)
        return responses.completion_logprobs(entries, self.token_text, text_offset)

    def usage(self, num_generated: int) -> dict:
        return responses.usage(sum(len(ids) for ids in self.prompt_ids), num_generated)

    async def collect(self, streams) -> list:
        finals = [None] * len(streams)
        async for p, output in merge(streams):
            finals[p] = output
        return finals

    def response(self, finals) -> dict:
        choices, generated = [], 0
        for p, output in enumerate(finals):
            for c in output.outputs:
                generated += len(c.token_ids)
                choice = responses.chat_choice if self.chat else responses.completion_choice
                choices.append(choice(p * self.n + c.index, c.text, c.finish_reason, self.logprobs(c.logprobs)))
        build = responses.chat_response if self.chat else responses.completion_response
        return build(self.request_id, self.created, self.server.model_name, choices, self.usage(generated))

    def chunk(self, choices, usage=None) -> str:
        build = responses.chat_chunk if self.chat else responses.completion_chunk
        payload = build(self.request_id, self.created, self.server.model_name, choices, usage)
        return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"

    async def events(self, streams):
        """Server-sent events: the chunks, the usage chunk if asked for, then `data: [DONE]`."""
        num_choices = len(streams) * self.n
        done = set()
        tokens = [0] * num_choices  # generated so far, per choice
        # Completions text_offset: where the next token's text starts in the concatenated token texts
        # (as in a whole response). Not the text sent so far: that lags while a stop string is held back.
        text_offset = [0] * num_choices
        try:
            if self.chat:
                yield self.chunk([responses.chat_chunk_choice(i, {"role": "assistant", "content": ""})
                                  for i in range(num_choices)])
            async for p, output in merge(streams):
                choices = []
                for c in output.outputs:
                    i = p * self.n + c.index
                    if i in done:
                        continue
                    tokens[i] = len(c.token_ids)
                    if not (c.delta or c.finish_reason or c.delta_logprobs):
                        continue
                    if c.finish_reason:
                        done.add(i)
                    logprobs = self.logprobs(c.delta_logprobs, text_offset[i]) if c.delta_logprobs else None
                    if logprobs and not self.chat:
                        text_offset[i] = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
                    if self.chat:
                        choices.append(responses.chat_chunk_choice(i, {"content": c.delta} if c.delta else {},
                                                                  c.finish_reason, logprobs))
                    else:
                        choices.append(responses.completion_choice(i, c.delta, c.finish_reason, logprobs))
                if choices:
                    yield self.chunk(choices)
            if self.req.include_usage:
                yield self.chunk([], self.usage(sum(tokens)))
        except EngineDeadError as e:
            yield f"data: {json.dumps(protocol.error_body(503, str(e), code='engine_dead'))}\n\n"
        yield "data: [DONE]\n\n"


