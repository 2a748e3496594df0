"""POST /v1/completions and /v1/chat/completions: one request in, whole or as server-sent events.

A completions request with several prompts becomes one engine request per prompt (choice index =
prompt * n + i). A client that goes away (mid-stream, or while waiting for a whole answer) aborts
its engine requests, which frees their KV pages.
"""

import asyncio
import dataclasses
import json
import time
import uuid

import jinja2
from starlette.requests import Request
from starlette.responses import Response

from jaxinfer.api import completion_shapes as responses, protocol, tool_calls
from jaxinfer.api.assistant import AssistantParser, OutputFormat
from jaxinfer.api.protocol import APIError, GenerationRequest
from jaxinfer.api.routes.generation import check_prompt_length, merge, respond, submit
from jaxinfer.async_engine import EngineDeadError
from jaxinfer.sampling import TokenLogprob


async def create_completion(request: Request) -> Response:
    server = request.app.state.server
    server.authorize(request)
    req = protocol.parse_completion_request(await server.read_json(request), server.sampling_defaults)
    server.check_model(req.model)
    prompt_ids = []
    tokenizer = server.tokenizer
    if req.suffix is not None:  # fill in the middle: the model's own end-of-file tokens end it too
        if tokenizer.fim_token_ids is None:
            raise APIError(400, f"'suffix' needs a model with fill-in-the-middle tokens; {server.model_name} has "
                           "none (Qwen2.5-Coder has)", param="suffix")
        stops = list(dict.fromkeys(req.params.stop_token_ids + tokenizer.fim_stop_token_ids))
        if len(stops) > protocol.MAX_STOP_TOKEN_IDS:
            raise APIError(400, f"with suffix, at most {protocol.MAX_STOP_TOKEN_IDS - len(tokenizer.fim_stop_token_ids)} "
                           "stop_token_ids", param="stop_token_ids")
        req.params = dataclasses.replace(req.params, stop_token_ids=stops)
    for prompt in req.prompts:
        if isinstance(prompt, list) and not all(0 <= t < server.vocab_size for t in prompt):
            raise APIError(400, f"prompt token ids must be in [0, {server.vocab_size})", param="prompt")
        # Off the event loop: a long prompt takes a while to tokenize.
        if req.suffix is not None:
            prompt_ids.append(await asyncio.to_thread(tokenizer.encode_infill, prompt, req.suffix))
        else:
            prompt_ids.append(await asyncio.to_thread(tokenizer.encode, prompt) if isinstance(prompt, str)
                              else prompt)
    return await _generate(request, server, req, prompt_ids, "prompt", chat=False)


async def create_chat_completion(request: Request) -> Response:
    server = request.app.state.server
    server.authorize(request)
    req = protocol.parse_chat_request(await server.read_json(request), server.sampling_defaults)
    server.check_model(req.model)
    template_kwargs = tool_template_kwargs(server, req.tools)
    constraint = tool_calls.constraint(req.tools, server.tokenizer)
    if constraint is not None:
        if req.params.structured_outputs is not None:
            raise APIError(400, f"'{req.structured_outputs_param}' and a required tool call (tool_choice) cannot "
                           "both constrain the answer", param="tool_choice")
        req.params = dataclasses.replace(req.params, structured_outputs=constraint)
        req.structured_outputs_param = "tools"
    tokenizer = server.tokenizer
    try:
        text = await asyncio.to_thread(tokenizer.apply_chat_template, req.messages, True,
                                       **req.chat_template_kwargs, **template_kwargs)
    except (jinja2.TemplateError, ValueError, TypeError) as e:  # TypeError: a variable the template misuses
        raise APIError(400, f"the chat template refused these messages: {e}",
                       param="chat_template_kwargs" if req.chat_template_kwargs else "messages") from None
    # The template writes the special tokens itself (BOS included where the model wants one).
    prompt_ids = await asyncio.to_thread(tokenizer.encode, text, False)
    return await _generate(request, server, req, [prompt_ids], "messages", chat=True,
                           output_format=server.output_format.for_prompt(text))


def tool_template_kwargs(server, tools: tool_calls.ToolRequest, param: str = "tools") -> dict:
    """What the chat template gets for `tools`; a 400 if the model's template writes no tool calls."""
    if not tools.tools:
        return {}
    if not server.output_format.tool_calls:
        raise APIError(400, "this model's chat template does not support tool calls (jaxinfer parses the Hermes "
                       "<tool_call> format, which Qwen2.5's template writes)", param=param)
    rendered = tools.template_tools()
    return {"tools": rendered} if rendered else {}


async def _generate(request, server, req: GenerationRequest, prompt_ids: list[list[int]], prompt_param: str,
                    chat: bool, output_format: OutputFormat | None = None) -> Response:
    for ids in prompt_ids:
        check_prompt_length(ids, req.params.max_tokens, server.max_model_len, prompt_param, req.max_tokens_param)
    if req.params.logit_bias and max(req.params.logit_bias) >= server.vocab_size:
        raise APIError(400, f"logit_bias token ids must be in [0, {server.vocab_size})", param="logit_bias")
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    streams = await submit(server.engine, req.params, prompt_ids, request_id, cache_salt=req.cache_salt,
                           constraint_param=req.structured_outputs_param)
    reply = _Reply(server, req, request_id, prompt_ids, chat, output_format or server.output_format)
    if req.echo:  # off the event loop, as the encoding was
        reply.prompt_texts = [p if isinstance(p, str) else await asyncio.to_thread(
            server.tokenizer.decode, p, skip_special_tokens=False) for p in req.prompts]
    return await respond(request, server.engine, streams, stream=req.stream, events=lambda: reply.events(streams),
                         whole=lambda: reply.collect(streams), build=reply.response)


class _Reply:
    """Turns engine outputs into one OpenAI response or a sequence of chunks."""

    def __init__(self, server, req: GenerationRequest, request_id: str, prompt_ids, chat: bool,
                 output_format: OutputFormat):
        self.server, self.req, self.request_id, self.prompt_ids, self.chat = server, req, request_id, prompt_ids, chat
        self.created = int(time.time())
        self.n = req.params.n
        tools = req.tools
        self.output_format = output_format
        # Chat answers go through the assistant parser when there is something to parse out of them.
        self.parses = chat and (self.output_format.think is not None or (tools is not None and tools.parses_calls))
        self.prompt_texts = None  # completions with echo: each prompt's text

    def parser(self) -> AssistantParser:
        return AssistantParser(self.output_format, parse_tool_calls=self.req.tools.parses_calls)

    def token_text(self, token_id: int) -> str:
        return self.server.tokenizer.decode([token_id], skip_special_tokens=False)

    def logprobs(self, entries, text_offset: int = 0):
        if entries is None or self.req.params.logprobs is None:
            return None
        if self.chat:
            return responses.chat_logprobs(entries, self.token_text)
        return responses.completion_logprobs(entries, self.token_text, text_offset)

    def echoed(self, p: int, output) -> tuple[str, list]:
        """Completions with echo: prompt p's text, and its tokens' logprob entries when logprobs are
        asked for (the first token's null)."""
        if self.req.params.logprobs is None:
            return self.prompt_texts[p], []
        k = self.req.params.logprobs
        first = TokenLogprob(self.prompt_ids[p][0], None, None)
        return self.prompt_texts[p], [first] + [TokenLogprob(e.token_id, e.logprob, e.top[:k])
                                                for e in output.prompt_logprobs[1:]]

    def shaped_prompt_logprobs(self, output):
        return None if output.prompt_logprobs is None else responses.prompt_logprobs(
            [e and TokenLogprob(e.token_id, e.logprob, e.top[:self.req.prompt_logprobs], e.rank)
             for e in output.prompt_logprobs], self.token_text)

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
                index = p * self.n + c.index
                if not self.chat:
                    text, entries, finish_reason = c.text, c.logprobs, c.finish_reason
                    if self.req.echo_only:
                        text, entries, finish_reason = "", [] if entries is not None else None, "length"
                    generated += 0 if self.req.echo_only else len(c.token_ids)
                    if self.req.echo:
                        prompt_text, prompt_entries = self.echoed(p, output)
                        text, entries = prompt_text + text, entries if entries is None else prompt_entries + entries
                    choice = responses.completion_choice(index, text, finish_reason, self.logprobs(entries))
                    if self.req.prompt_logprobs is not None:
                        choice["prompt_logprobs"] = self.shaped_prompt_logprobs(output)
                    choices.append(choice)
                    continue
                generated += len(c.token_ids)
                logprobs = self.logprobs(c.logprobs)
                if not self.parses:
                    choices.append(responses.chat_choice(index, responses.assistant_message(c.text), c.finish_reason,
                                                         logprobs))
                    continue
                parser = self.parser()
                parser.feed(c.text)
                parser.finish()
                calls = [call.openai() for call in parser.tool_calls]
                message = responses.assistant_message(parser.content or (None if calls else ""),
                                                      parser.reasoning or None, calls,
                                                      thinks=self.output_format.think is not None)
                choices.append(responses.chat_choice(index, message, parser.finish_reason(c.finish_reason), logprobs))
        build = responses.chat_response if self.chat else responses.completion_response
        response = build(self.request_id, self.created, self.server.model_name, choices, self.usage(generated))
        if self.chat and self.req.prompt_logprobs is not None:  # vLLM's place for them in a chat answer
            response["prompt_logprobs"] = self.shaped_prompt_logprobs(finals[0])
        return response

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
        parsers = [self.parser() for _ in range(num_choices)] if self.parses else None
        echoed = set()  # completions with echo: the choices whose prompt went out
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
                    tokens[i] = 0 if self.req.echo_only else len(c.token_ids)
                    delta, entries, finish_reason = c.delta, c.delta_logprobs, c.finish_reason
                    if self.req.echo_only:  # the prompt alone, in the first chunk
                        delta, entries, finish_reason = "", [] if entries is not None else None, "length"
                    if self.req.echo and i not in echoed:
                        echoed.add(i)
                        prompt_text, prompt_entries = self.echoed(p, output)
                        delta, entries = prompt_text + delta, entries if entries is None else prompt_entries + entries
                    if not (delta or finish_reason or entries):
                        continue
                    if finish_reason:
                        done.add(i)
                    logprobs = self.logprobs(entries, text_offset[i]) if entries else None
                    if logprobs and not self.chat:
                        text_offset[i] = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
                    if parsers:
                        parser = parsers[i]
                        parsed = parser.feed(c.delta)
                        if c.finish_reason:
                            rest = parser.finish()
                            parsed.content += rest.content
                            parsed.reasoning += rest.reasoning
                            parsed.tool_calls += rest.tool_calls
                        delta = responses.assistant_delta(parsed.content, parsed.reasoning,
                                                          [d.openai() for d in parsed.tool_calls])
                        if delta or c.finish_reason or logprobs:
                            choices.append(responses.chat_chunk_choice(i, delta, parser.finish_reason(c.finish_reason),
                                                                      logprobs))
                    elif self.chat:
                        choices.append(responses.chat_chunk_choice(i, {"content": c.delta} if c.delta else {},
                                                                  c.finish_reason, logprobs))
                    else:
                        choices.append(responses.completion_choice(i, delta, finish_reason, logprobs))
                if choices:
                    yield self.chunk(choices)
            if self.req.include_usage:
                yield self.chunk([], self.usage(sum(tokens)))
        except EngineDeadError as e:
            yield f"data: {json.dumps(protocol.error_body(503, str(e), code='engine_dead'))}\n\n"
        yield "data: [DONE]\n\n"


