"""POST /v1/responses: OpenAI's Responses API, stateless (the request: jaxinfer/api/openai_responses.py).

The model's text goes through the one assistant parser (api/assistant.py) into output items:
reasoning, then a message, then function calls, in the order they appear. A whole response and a
stream are built by the same `OutputItems`: the stream sends its events as the text arrives, a whole
response takes its items at the end. Each item is closed (`response.output_item.done`) when the next
begins; text that arrives after a function call opens a new message item.
"""

import asyncio
import json
import time

import jinja2
from starlette.requests import Request
from starlette.responses import Response

from jaxinfer.api import openai_responses as shapes
from jaxinfer.api.assistant import AssistantDelta, AssistantParser
from jaxinfer.api.openai_responses import ResponsesRequest, parse_responses_request
from jaxinfer.api.errors import APIError
from jaxinfer.api.routes.generation import check_prompt_length, respond, submit
from jaxinfer.async_engine import EngineDeadError


async def create_response(request: Request) -> Response:
    server = request.app.state.server
    server.authorize(request)
    req = parse_responses_request(await server.read_json(request), server.output_format, server.tokenizer,
                                  server.sampling_defaults)
    server.check_model(req.model)
    try:
        prompt_ids = await asyncio.to_thread(server.tokenizer.encode_chat, req.messages,
                                             tools=req.tool_request.template_tools())
    except (jinja2.TemplateError, ValueError) as e:
        raise APIError(400, f"the chat template refused this input: {e}", param="input") from None
    check_prompt_length(prompt_ids, req.params.max_tokens, server.max_model_len, "input", "max_output_tokens")
    response_id = shapes.new_id("resp")
    streams = await submit(server.engine, req.params, [prompt_ids], response_id,
                           constraint_param=req.structured_outputs_param, prompt_param="input")
    reply = _Reply(server, req, response_id, len(prompt_ids))
    return await respond(request, server.engine, streams, stream=req.stream, events=lambda: reply.events(streams[0]),
                         whole=lambda: reply.whole(streams[0]), build=lambda response: response)


class _Reply:
    def __init__(self, server, req: ResponsesRequest, response_id: str, num_prompt_tokens: int):
        self.server, self.req, self.response_id = server, req, response_id
        self.num_prompt_tokens = num_prompt_tokens
        self.created_at = int(time.time())
        self.parser = AssistantParser(server.output_format, parse_tool_calls=req.tool_request.parses_calls)
        self.items = OutputItems()

    def response(self, status: str, output=None) -> dict:
        usage = None
        if output is not None:
            cached = output.metrics.num_cached_tokens if output.metrics is not None else 0
            usage = shapes.usage(self.num_prompt_tokens, len(output.outputs[0].token_ids), cached)
        return shapes.response_object(self.response_id, self.created_at, self.server.model_name, self.req.echo,
                                      self.items.output, status, usage)

    def feed(self, output) -> list[tuple[str, dict]]:
        """The events of one engine output; the last ones close every item."""
        choice = output.outputs[0]
        events = self.items.feed(self.parser.feed(choice.delta)) if choice.delta else []
        if choice.finish_reason is not None:
            events += self.items.feed(self.parser.finish())
            events += self.items.close(_status(choice.finish_reason))
        return events

    async def whole(self, stream) -> dict:
        output = None
        async for output in stream:
            self.feed(output)
        return self.response(_status(output.outputs[0].finish_reason), output)

    async def events(self, stream):
        sequence_number = 0

        def event(kind: str, payload: dict) -> str:
            nonlocal sequence_number
            data = {"type": kind, "sequence_number": sequence_number, **payload}
            sequence_number += 1
            return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"

        yield event("response.created", {"response": self.response("in_progress")})
        yield event("response.in_progress", {"response": self.response("in_progress")})
        try:
            async for output in stream:
                for kind, payload in self.feed(output):
                    yield event(kind, payload)
                if output.finished:
                    status = _status(output.outputs[0].finish_reason)
                    yield event(f"response.{status}", {"response": self.response(status, output)})
        except EngineDeadError as e:
            yield event("error", {"code": "engine_dead", "message": str(e), "param": None})


def _status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


class OutputItems:
    """The response's output items, built from the parser's deltas; each change as the Responses
    stream's events ((type, payload) pairs, without sequence numbers)."""

    def __init__(self):
        self.output: list[dict] = []  # the closed items
        self._open: dict | None = None  # the item being written: kind, id, text, and a call's call_id and name
        self._calls = 0  # tool calls of the parser seen

    def feed(self, delta: AssistantDelta) -> list[tuple[str, dict]]:
        events = []
        if delta.reasoning:
            events += self._write("reasoning", delta.reasoning)
        if delta.content:
            events += self._write("message", delta.content)
        for call in delta.tool_calls:
            if call.index == self._calls:  # a new call: its id and name
                self._calls += 1
                events += self._begin("function_call", call_id=call.id, name=call.name)
            if call.arguments:
                events += self._write("function_call", call.arguments)
        return events

    def close(self, status: str) -> list[tuple[str, dict]]:
        """The end: the open item gets the response's status ("incomplete" if the text was cut off). An
        answer with nothing in it is one empty message."""
        events = self._begin("message") if not (self.output or self._open) else []
        return events + self._end(status) if self._open else events

    def _write(self, kind: str, text: str) -> list[tuple[str, dict]]:
        events = [] if self._open and self._open["kind"] == kind else self._begin(kind)
        item = self._open
        item["text"] += text
        where = {"item_id": item["id"], "output_index": len(self.output)}
        if kind == "function_call":
            return events + [("response.function_call_arguments.delta", {**where, "delta": text})]
        if kind == "reasoning":
            return events + [("response.reasoning_text.delta", {**where, "content_index": 0, "delta": text})]
        return events + [("response.output_text.delta", {**where, "content_index": 0, "delta": text, "logprobs": []})]

    def _begin(self, kind: str, **call) -> list[tuple[str, dict]]:
        events = self._end("completed") if self._open else []
        prefix = {"reasoning": "rs", "message": "msg", "function_call": "fc"}[kind]
        self._open = {"kind": kind, "id": shapes.new_id(prefix), "text": "", **call}
        events.append(("response.output_item.added", {"output_index": len(self.output),
                                                      "item": self._item("in_progress")}))
        if kind != "function_call":
            events.append(("response.content_part.added", {**self._where(), "content_index": 0,
                                                           "part": self._part("")}))
        return events

    def _end(self, status: str) -> list[tuple[str, dict]]:
        item, where = self._open, self._where()
        if item["kind"] == "function_call":
            events = [("response.function_call_arguments.done", {**where, "name": item["name"],
                                                                  "arguments": item["text"]})]
        else:
            done = "response.output_text.done" if item["kind"] == "message" else "response.reasoning_text.done"
            events = [(done, {**where, "content_index": 0, "text": item["text"],
                              **({"logprobs": []} if item["kind"] == "message" else {})}),
                      ("response.content_part.done", {**where, "content_index": 0, "part": self._part(item["text"])})]
        whole = self._item(status)
        events.append(("response.output_item.done", {"output_index": len(self.output), "item": whole}))
        self.output.append(whole)
        self._open = None
        return events

    def _where(self) -> dict:
        return {"item_id": self._open["id"], "output_index": len(self.output)}

    def _part(self, text: str) -> dict:
        return shapes.reasoning_part(text) if self._open["kind"] == "reasoning" else shapes.output_text_part(text)

    def _item(self, status: str) -> dict:
        item = self._open
        if item["kind"] == "function_call":
            return shapes.function_call_item(item["id"], item["call_id"], item["name"],
                                             item["text"] if status != "in_progress" else "", status)
        build = shapes.reasoning_item if item["kind"] == "reasoning" else shapes.message_item
        return build(item["id"], item["text"], status)
