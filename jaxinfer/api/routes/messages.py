"""POST /v1/messages: Anthropic's Messages API, whole or as Anthropic's server-sent events.

The messages are rendered with the model's chat template (as /v1/chat/completions renders them) and
the answer is read by the one assistant-output parser (api/assistant.py): its text, reasoning and
tool calls become text, thinking and tool_use blocks. Errors, those of the shared code included,
are answered in Anthropic's shape, and the API key is read from `x-api-key` as well as a Bearer
header. A client that goes away aborts its engine request, which frees its KV pages.
"""

import asyncio
import dataclasses
import hmac

import jinja2
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from jaxinfer.api import anthropic, tool_calls
from jaxinfer.api.anthropic import MessagesRequest, event
from jaxinfer.api.assistant import AssistantDelta, AssistantParser
from jaxinfer.api.errors import APIError
from jaxinfer.api.routes.generation import merge, respond, submit
from jaxinfer.async_engine import EngineDeadError


async def create_message(request: Request) -> Response:
    try:
        return await _create_message(request)
    except APIError as e:
        status, body = anthropic.error_of(e)
        return JSONResponse(body, status_code=status, headers=e.headers)


def authorize(server, request: Request) -> None:
    """Anthropic's clients send the key as `x-api-key`; a Bearer header works too."""
    key = request.headers.get("x-api-key")
    if server.api_key is None or key is None:
        return server.authorize(request)
    if not hmac.compare_digest(key.strip().encode(), server.api_key.encode()):
        raise APIError(401, "invalid API key (send 'x-api-key: <key>' or 'Authorization: Bearer <key>')")


async def _create_message(request: Request) -> Response:
    server = request.app.state.server
    authorize(server, request)
    req = anthropic.parse_messages_request(await server.read_json(request), server.sampling_defaults)
    server.check_model(req.model)
    if req.tool_request.tools and not server.output_format.tool_calls:
        raise APIError(400, "tools are not supported: this model's chat template does not support tool calls",
                       param="tools")
    try:
        prompt_ids = await asyncio.to_thread(_render, server.tokenizer, req)
    except (jinja2.TemplateError, ValueError) as e:
        raise APIError(400, f"the chat template refused these messages: {e}", param="messages") from None
    max_len = server.max_model_len
    if len(prompt_ids) >= max_len:
        raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; this model's maximum context length "
                       f"(max_model_len) is {max_len}", param="messages")
    # Anthropic's clients must send max_tokens and often send more than a small model's context
    # holds: the answer stops where the context ends (stop_reason max_tokens), not refused.
    params = dataclasses.replace(req.params, max_tokens=min(req.params.max_tokens, max_len - len(prompt_ids)),
                                 structured_outputs=(tool_calls.constraint(req.tool_request, server.tokenizer)
                                                     or req.params.structured_outputs))
    message_id = anthropic.new_message_id()
    constraint_param = "output_config.format" if req.params.structured_outputs else "tool_choice"
    streams = await submit(server.engine, params, [prompt_ids], message_id, constraint_param=constraint_param,
                           prompt_param="messages")
    reply = _Reply(server, req, message_id, len(prompt_ids))
    return await respond(request, server.engine, streams, stream=req.stream, events=lambda: reply.events(streams),
                         whole=lambda: reply.collect(streams), build=reply.message)


def _render(tokenizer, req: MessagesRequest) -> list[int]:
    """The prompt: the conversation and the generation prompt, then a final assistant turn's text
    (prefill), which the answer continues."""
    text = tokenizer.apply_chat_template(req.messages, add_generation_prompt=True,
                                         tools=req.tool_request.template_tools())
    return tokenizer.encode(text + req.prefill, add_special_tokens=False)


class _Reply:
    """Turns the engine's output for one message into Anthropic's message or its events."""

    def __init__(self, server, req: MessagesRequest, message_id: str, num_prompt_tokens: int):
        self.server, self.req, self.message_id, self.num_prompt_tokens = server, req, message_id, num_prompt_tokens
        self.parser = AssistantParser(server.output_format, parse_tool_calls=req.tool_request.parses_calls)

    async def collect(self, streams):
        final = None
        async for _, output in merge(streams):
            final = output.outputs[0]
        return final

    def message(self, output) -> dict:
        self.parser.feed(output.text)
        self.parser.finish()
        content = [anthropic.thinking_block(self.parser.reasoning)] if self.parser.reasoning else []
        if self.parser.content:
            content.append(anthropic.text_block(self.parser.content))
        content += [anthropic.tool_use_block(c.id, c.name, anthropic.tool_input(c.arguments))
                    for c in self.parser.tool_calls]
        return anthropic.message(self.message_id, self.server.model_name, content, *self.stop(output),
                                 self.num_prompt_tokens, len(output.token_ids))

    def stop(self, output) -> tuple[str | None, str | None]:
        """(stop_reason, stop_sequence). The engine says "stop" for an end-of-turn token, a finished
        tool-call grammar and a stop string alike: a stop string it is when the last token is no
        end-of-turn token and a stop sequence is in the answer's whole text (the engine cut the text
        at the first one), which tells which."""
        reason = output.finish_reason
        if reason == "length":
            return "max_tokens", None
        if self.parser.tool_calls:
            return "tool_use", None
        stops = self.req.params.stop
        if reason == "stop" and stops and output.token_ids and output.token_ids[-1] not in self._end_tokens():
            whole = self.server.tokenizer.decode(output.token_ids)
            hits = [(whole.find(s), i) for i, s in enumerate(stops) if s in whole]
            if hits:
                return "stop_sequence", stops[min(hits)[1]]
        return "end_turn", None

    def _end_tokens(self) -> set[int]:
        return set(self.req.params.stop_token_ids) | set(self.server.tokenizer.eos_token_ids)

    async def events(self, streams):
        """message_start, ping, the content blocks (start, deltas, stop), message_delta with the stop
        reason and output tokens, message_stop; an `error` event if the engine fails."""
        start = anthropic.message(self.message_id, self.server.model_name, [], None, None, self.num_prompt_tokens, 0)
        yield event("message_start", {"type": "message_start", "message": start})
        yield event("ping", {"type": "ping"})
        blocks = _Blocks()
        final = None
        try:
            async for _, output in merge(streams):
                final = output.outputs[0]
                for e in blocks.add(self.parser.feed(final.delta)):
                    yield e
                if final.finish_reason:
                    break
            if final is None:  # aborted before any output: nobody is reading
                return
            for e in blocks.add(self.parser.finish()):
                yield e
            for e in blocks.close():
                yield e
            stop_reason, stop_sequence = self.stop(final)
            yield event("message_delta", {"type": "message_delta",
                                          "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                          "usage": {"output_tokens": len(final.token_ids)}})
            yield event("message_stop", {"type": "message_stop"})
        except EngineDeadError as e:
            yield event("error", anthropic.error_body("api_error", str(e)))


class _Blocks:
    """A streamed answer's content blocks: a new one each time the kind of text changes, and one per
    tool call; each opened with content_block_start and closed with content_block_stop."""

    def __init__(self):
        self.index, self.kind = -1, None

    def add(self, delta: AssistantDelta):
        if delta.reasoning:
            yield from self._ensure("thinking", anthropic.thinking_block(""))
            yield self._delta({"type": "thinking_delta", "thinking": delta.reasoning})
        if delta.content:
            yield from self._ensure("text", anthropic.text_block(""))
            yield self._delta({"type": "text_delta", "text": delta.content})
        for call in delta.tool_calls:
            if call.id is not None:
                yield from self._open("tool_use", anthropic.tool_use_block(call.id, call.name, {}))
            if call.arguments:
                yield self._delta({"type": "input_json_delta", "partial_json": call.arguments})

    def close(self):
        if self.kind is not None:
            yield event("content_block_stop", {"type": "content_block_stop", "index": self.index})
            self.kind = None

    def _ensure(self, kind: str, block: dict):
        if self.kind != kind:
            yield from self._open(kind, block)

    def _open(self, kind: str, block: dict):
        yield from self.close()
        self.index, self.kind = self.index + 1, kind
        yield event("content_block_start", {"type": "content_block_start", "index": self.index,
                                            "content_block": block})

    def _delta(self, delta: dict) -> str:
        return event("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta})
