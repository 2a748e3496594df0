"""The Starlette app: routes (described at /openapi.json), the chat page (routes/frontend.py), API-key
check, body limits (size and JSON depth), and every error as OpenAI's JSON shape (a 500 without the
exception's text).

The app does not own the engine's life: whoever builds it (server.py / `jaxinfer serve`, tests)
starts the AsyncLLMEngine before serving and shuts it down after.
"""

import hmac
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from jaxinfer.api.assistant import OutputFormat
from jaxinfer.api.metrics import ServerMetrics
from jaxinfer.api.openapi import openapi_document
from jaxinfer.api.protocol import APIError, error_body
from jaxinfer.api.completion_shapes import model_card
from jaxinfer.api.routes.completions import create_chat_completion, create_completion
from jaxinfer.api.routes.frontend import frontend_routes
from jaxinfer.api.routes.openai_responses import create_response
from jaxinfer.api.routes.messages import create_message
from jaxinfer.api.routes.tokenize import detokenize, tokenize
from jaxinfer.async_engine import AsyncLLMEngine

logger = logging.getLogger("jaxinfer")

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
# Arrays and objects nested in a request body, at most. The deepest field read nests 5 levels (a
# chat message's text part); without a bound, a deep body makes the parser or a repr() recurse.
MAX_JSON_DEPTH = 64
# A \uD800-\uDFFF escape: JSON can spell a lone UTF-16 surrogate, which no UTF-8 consumer (the
# tokenizer, the prefix-cache digest, the response encoder) takes.
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


@dataclass(slots=True)
class ServerState:
    """What the route handlers share (`request.app.state.server`)."""

    engine: AsyncLLMEngine
    model_name: str
    max_model_len: int
    metrics: ServerMetrics
    api_key: str | None
    max_body_bytes: int
    created: int  # unix time the model was loaded, for /v1/models
    openapi: dict  # /openapi.json
    output_format: OutputFormat  # what the model's answers hold beyond text (tool calls, reasoning)

    @property
    def tokenizer(self):
        return self.engine.engine.tokenizer

    @property
    def sampling_defaults(self) -> dict:
        """The model's own defaults for what a request leaves out (`jaxinfer.generation_config`)."""
        return getattr(self.engine.engine, "sampling_defaults", {})

    @property
    def vocab_size(self) -> int:
        return self.engine.engine.model_config.vocab_size

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    async def read_json(self, request: Request) -> dict:
        """The request's JSON object; 413 past `max_body_bytes`, 400 if it is not a JSON object."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _too_large(self.max_body_bytes)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _too_large(self.max_body_bytes)
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            body = json.loads(raw)
        except ValueError as e:  # UnicodeDecodeError included
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        except RecursionError:  # nested past what the parser can follow
            raise _too_deep() from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        if _nests_deeper_than(body, MAX_JSON_DEPTH):
            raise _too_deep()
        if SURROGATE_ESCAPE.search(raw) and not _all_strings_encode(body):
            raise APIError(400, "the request body has a string with a lone UTF-16 surrogate (a \\ud800-\\udfff "
                           "escape without its pair): not Unicode text", code="invalid_unicode")
        return body


def _nests_deeper_than(value, depth: int) -> bool:
    """Whether arrays and objects nest more than `depth` levels in `value` (parsed JSON): level by
    level, without recursion; a node's children are scanned for containers at C speed first, which
    keeps an 8 MB list of token ids under 0.1 s."""
    level = [value]
    for _ in range(depth):
        deeper = []
        for node in level:
            children = node.values() if type(node) is dict else node
            if not _CONTAINERS.isdisjoint(map(type, children)):
                deeper += [child for child in children if type(child) in _CONTAINERS]
        if not deeper:
            return False
        level = deeper
    return True


_CONTAINERS = frozenset({dict, list})


def _all_strings_encode(body: dict) -> bool:
    """Whether every string in `body`, keys included, is Unicode text (encodes as UTF-8)."""
    try:
        json.dumps(body, ensure_ascii=False).encode()  # no deeper than MAX_JSON_DEPTH: checked first
    except UnicodeEncodeError:
        return False
    return True


def _too_deep() -> APIError:
    return APIError(400, f"the request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep",
                    code="json_too_deep")


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")


def create_app(engine: AsyncLLMEngine, *, served_model_name: str | None = None, api_key: str | None = None,
               metrics: ServerMetrics | None = None, price_per_hour: float | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, disable_frontend: bool = False) -> Starlette:
    """The OpenAI-compatible app over a (started) AsyncLLMEngine, with the chat page at / unless
    `disable_frontend`.

    Without `metrics`, the app makes its own registry and, if the engine has no observer yet,
    becomes it (several apps may share one engine; only one gets its token timings).
    """
    name = served_model_name or engine.engine.model_config.name or "default"
    if metrics is None:
        metrics = ServerMetrics(engine, name, price_per_hour)
        if engine.observer is None:
            engine.observer = metrics
    routes = [
        Route("/v1/completions", create_completion, methods=["POST"]),
        Route("/v1/chat/completions", create_chat_completion, methods=["POST"]),
        Route("/v1/responses", create_response, methods=["POST"]),
        Route("/v1/messages", create_message, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]), Route("/detokenize", detokenize, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", prometheus_metrics, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
    ]
    if not disable_frontend:
        routes += frontend_routes()
    app = Starlette(routes=routes, exception_handlers={
        APIError: _api_error, HTTPException: _http_error, Exception: _internal_error})
    app.state.server = ServerState(engine, name, engine.engine.config.max_model_len, metrics, api_key,
                                   max_body_bytes, int(time.time()),
                                   openapi_document(routes, api_key=api_key is not None),
                                   OutputFormat.from_tokenizer(engine.engine.tokenizer))
    return app


async def list_models(request: Request) -> Response:
    server: ServerState = request.app.state.server
    server.authorize(request)
    return JSONResponse({"object": "list",
                         "data": [model_card(server.model_name, server.created, server.max_model_len)]})


async def health(request: Request) -> Response:
    """200 while the engine loop runs and admits requests; 503 once it failed or is draining."""
    engine = request.app.state.server.engine
    if not engine.healthy:
        reason = f"the engine failed: {engine.error!r}" if engine.error else "the engine is not running"
        return JSONResponse({"status": "unhealthy", "error": reason}, status_code=503)
    if not engine.accepting:
        return JSONResponse({"status": "draining"}, status_code=503)
    return JSONResponse({"status": "ok"})


async def prometheus_metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(request.app.state.server.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def openapi_json(request: Request) -> Response:
    return JSONResponse(request.app.state.server.openapi)


async def _api_error(request: Request, exc: APIError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return JSONResponse(error_body(exc.status_code, exc.detail), status_code=exc.status_code, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    """A 500 that tells the client nothing of the exception (it may hold paths, prompts, keys): an error
    id to quote, with which the traceback is logged."""
    error_id = uuid.uuid4().hex[:16]
    logger.error("internal error %s on %s %s", error_id, request.method, request.url.path, exc_info=exc)
    return JSONResponse(error_body(500, f"internal server error (error id {error_id}, in the server's log)",
                                   code="internal_error"), status_code=500)
