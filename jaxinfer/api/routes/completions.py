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

import anyio
import jinja2
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from jaxinfer.api import protocol, responses
from jaxinfer.api.protocol import APIError, GenerationRequest
from jaxinfer.async_engine import EngineDeadError, NotAcceptingError, QueueFullError, RequestStream
from jaxinfer.structured_outputs import StructuredOutputsError

RETRY_AFTER_S = 1


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
    streams = await _submit(server.engine, req, prompt_ids, request_id)
    reply = _Reply(server, req, request_id, prompt_ids, chat)
    abort_unfinished = functools.partial(_abort_unfinished, streams, server.engine.abort)
    if req.stream:
        return _EventStreamResponse(reply.events(streams), abort_unfinished, media_type="text/event-stream",
                                    headers={"Cache-Control": "no-cache"})
    try:
        finals = await _unless_disconnected(request, reply.collect(streams))
    except EngineDeadError as e:
        raise APIError(503, str(e), code="engine_dead") from None
    finally:
        abort_unfinished()
    if finals is None:
        return Response(status_code=499)  # the client is gone; nobody reads this
    return JSONResponse(reply.response(finals))


async def _submit(engine, req: GenerationRequest, prompt_ids, request_id: str) -> list[RequestStream]:
    streams = []
    try:
        for i, ids in enumerate(prompt_ids):
            streams.append(await engine.add_request(ids, req.params, f"{request_id}-{i}", cache_salt=req.cache_salt))
    except BaseException as e:
        for stream in streams:
            engine.abort(stream.request_id)
        if isinstance(e, StructuredOutputsError):
            raise APIError(400, str(e), param=req.structured_outputs_param) from None
        if isinstance(e, ValueError):
            raise APIError(400, str(e), param="prompt") from None
        if isinstance(e, (QueueFullError, NotAcceptingError)):
            raise APIError(503, f"the server is busy: {e}", code="overloaded",
                           headers={"Retry-After": str(getattr(e, "retry_after_s", RETRY_AFTER_S))}) from None
        if isinstance(e, EngineDeadError):
            raise APIError(503, str(e), code="engine_dead") from None
        raise
    return streams


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
        async for p, output in _merge(streams):
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
            async for p, output in _merge(streams):
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


async def _merge(streams: list[RequestStream]):
    """(index of the stream, output) from all streams as they come."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(p, stream):
        try:
            async for output in stream:
                queue.put_nowait((p, output))
            queue.put_nowait((p, None))
        except Exception as e:
            queue.put_nowait((p, e))

    tasks = [asyncio.create_task(pump(p, s)) for p, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            p, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield p, item
    finally:
        for task in tasks:
            task.cancel()


def _abort_unfinished(streams: list[RequestStream], abort) -> None:
    for stream in streams:
        if not stream.finished:
            abort(stream.request_id)


async def _unless_disconnected(request: Request, work):
    """The result of `work`, or None if the client disconnects first (then `work` is cancelled)."""
    work = asyncio.ensure_future(work)

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            try:
                await work
            except asyncio.CancelledError:
                pass
    return work.result() if not work.cancelled() else None


class _EventStreamResponse(StreamingResponse):
    """A StreamingResponse that stops as soon as the client disconnects, whatever ASGI version the
    server speaks, then closes its generator and aborts the engine requests it has not finished."""

    def __init__(self, content, abort_unfinished, **kwargs):
        super().__init__(content, **kwargs)
        self.abort_unfinished = abort_unfinished

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tasks:
                async def stream():
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away while we were sending
                        pass
                    tasks.cancel_scope.cancel()

                tasks.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tasks.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()
            self.abort_unfinished()
