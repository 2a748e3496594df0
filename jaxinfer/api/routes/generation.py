"""What every generating route shares: submitting a request's prompts to the engine (engine errors as
API errors), merging their output streams, aborting what a gone client left unfinished, and an
event-stream response that notices the client going away."""

import asyncio
import functools

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from jaxinfer.api.protocol import APIError
from jaxinfer.async_engine import EngineDeadError, NotAcceptingError, QueueFullError, RequestStream
from jaxinfer.sampling import SamplingParams
from jaxinfer.structured_outputs import StructuredOutputsError

RETRY_AFTER_S = 1


async def submit(engine, params: SamplingParams, prompt_ids: list[list[int]], request_id: str, *,
                 cache_salt: str | None = None, constraint_param: str | None = None,
                 prompt_param: str = "prompt") -> list[RequestStream]:
    """One engine request per prompt (ids `{request_id}-{i}`); all or none: a refusal aborts those submitted."""
    streams = []
    try:
        for i, ids in enumerate(prompt_ids):
            streams.append(await engine.add_request(ids, params, f"{request_id}-{i}", cache_salt=cache_salt))
    except BaseException as e:
        for stream in streams:
            engine.abort(stream.request_id)
        if isinstance(e, StructuredOutputsError):
            raise APIError(400, str(e), param=constraint_param) from None
        if isinstance(e, ValueError):
            raise APIError(400, str(e), param=prompt_param) from None
        if isinstance(e, (QueueFullError, NotAcceptingError)):
            raise APIError(503, f"the server is busy: {e}", code="overloaded",
                           headers={"Retry-After": str(getattr(e, "retry_after_s", RETRY_AFTER_S))}) from None
        if isinstance(e, EngineDeadError):
            raise APIError(503, str(e), code="engine_dead") from None
        raise
    return streams


async def respond(request: Request, engine, streams: list[RequestStream], *, stream: bool, events, whole,
                  build) -> Response:
    """The answer to a generating request: `events()` (an async generator of server-sent events) as
    an event stream, or `build(await whole())` as JSON. Whatever the client leaves unfinished, by going
    away or by an error, is aborted (its KV pages freed)."""
    abort = functools.partial(abort_unfinished, streams, engine.abort)
    if stream:
        return EventStreamResponse(events(), abort, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        final = await unless_disconnected(request, whole())
    except EngineDeadError as e:
        raise APIError(503, str(e), code="engine_dead") from None
    finally:
        abort()
    if final is None:
        return Response(status_code=499)  # the client is gone; nobody reads this
    return JSONResponse(build(final))


def check_prompt_length(prompt_ids: list[int], max_tokens: int | None, max_model_len: int, prompt_param: str,
                        max_tokens_param: str) -> None:
    """A prompt that is not empty and leaves room in max_model_len for max_tokens (if given)."""
    if not prompt_ids:
        raise APIError(400, "the prompt is empty", param=prompt_param)
    if len(prompt_ids) >= max_model_len:
        raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; this model's maximum context length "
                       f"(max_model_len) is {max_model_len}", param=prompt_param)
    if max_tokens is not None and len(prompt_ids) + max_tokens > max_model_len:
        raise APIError(400, f"the prompt ({len(prompt_ids)} tokens) plus {max_tokens_param} ({max_tokens}) "
                       f"exceeds max_model_len ({max_model_len})", param=max_tokens_param)


async def merge(streams: list[RequestStream]):
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


def abort_unfinished(streams: list[RequestStream], abort) -> None:
    for stream in streams:
        if not stream.finished:
            abort(stream.request_id)


async def unless_disconnected(request: Request, work):
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


class EventStreamResponse(StreamingResponse):
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
