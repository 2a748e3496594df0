"""/openapi.json: a valid OpenAPI 3.1 document that lists every route the app serves, and whose request
bodies say what the readers in api/protocol.py accept: every field it declares is read and refused when
the schema refuses it, and every bound it states is the one the readers hold."""

import math

import httpx
import jsonschema
import pytest
from fake_engine import FakeEngine
from openapi_spec_validator import validate
from starlette.routing import Route

from jaxinfer.api import create_app
from jaxinfer.api.protocol import APIError, parse_chat_request, parse_completion_request
from jaxinfer.async_engine import AsyncLLMEngine


@pytest.fixture(scope="module")
def document(served) -> dict:
    response = httpx.get(f"{served.url}/openapi.json")
    assert response.status_code == 200
    return response.json()


def test_openapi_json_is_a_valid_openapi_3_1_document(document):
    assert document["openapi"] == "3.1.0"
    validate(document)  # openapi-spec-validator: raises on any violation of the 3.1 specification


def test_openapi_lists_every_route_the_app_serves(served, document):
    # Routes only: the chat page's static files are a Mount, not part of the API.
    served_routes = {(route.path, method.lower()) for route in served.app.routes if isinstance(route, Route)
                     for method in route.methods if method != "HEAD"}
    documented = {(path, method) for path, operations in document["paths"].items() for method in operations}
    assert documented == served_routes
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics",
            "/openapi.json"} <= {path for path, _ in served_routes}


def test_with_an_api_key_the_v1_routes_declare_bearer_auth():
    document = create_app(AsyncLLMEngine(FakeEngine()), api_key="sesame").state.server.openapi
    validate(document)
    assert document["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, operations in document["paths"].items():
        for operation in operations.values():
            assert ("security" in operation) == path.startswith("/v1/"), path


# -- the request schemas and the readers agree --------------------------------------------------

COMPLETION = ("CompletionRequest", parse_completion_request, {"prompt": "hi"})
CHAT = ("ChatCompletionRequest", parse_chat_request,
        {"messages": [{"role": "user", "content": "hi"}], "logprobs": True})  # top_logprobs needs logprobs
CANDIDATES = ["x", 5, 1.5, True, {"bogus": 1}, [None]]  # one of these breaks any field's schema


def fields(request_name: str, document) -> list[tuple[str, dict]]:
    schema = document["components"]["schemas"][request_name]
    return sorted(schema["properties"].items())


def field_validator(document, field_schema: dict) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({**field_schema, "components": document["components"]})


def refusal(parse, body: dict) -> APIError | None:
    try:
        parse(body)
    except APIError as e:
        return e
    return None


@pytest.mark.parametrize("request_name, parse, base", [COMPLETION, CHAT], ids=["completion", "chat"])
def test_a_value_the_schema_refuses_is_refused_naming_its_field(document, request_name, parse, base):
    """For every declared field: the first candidate value its schema refuses gets a 400 naming it (a
    declared field nobody reads, or read more loosely than declared, fails here)."""
    assert refusal(parse, base) is None
    for name, field_schema in fields(request_name, document):
        validator = field_validator(document, field_schema)
        bad = next(value for value in CANDIDATES if not validator.is_valid(value))
        body = {**base, "stream": True} if name == "stream_options" else base  # only read when streaming
        error = refusal(parse, {**body, name: bad})
        assert error is not None and error.status == 400, (name, bad)
        assert error.param == name, (name, bad, error.message)


def bounds(field_schema: dict) -> list[tuple[str, float, str]]:
    """(keyword, limit, type) of each numeric bound a field's schema states."""
    inner = next(s for s in field_schema.get("anyOf", [field_schema]) if s.get("type") != "null")
    return [(key, inner[key], inner["type"]) for key in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")
            if key in inner]


def just_past(key: str, limit, kind: str) -> tuple:
    """(a value the bound admits, the nearest value it refuses)."""
    step = 1 if kind == "integer" else None
    if key == "minimum":
        return limit, limit - 1 if step else math.nextafter(limit, -math.inf)
    if key == "maximum":
        return limit, limit + 1 if step else math.nextafter(limit, math.inf)
    if key == "exclusiveMinimum":
        return (limit + 1 if step else math.nextafter(limit, math.inf)), limit
    return (limit - 1 if step else math.nextafter(limit, -math.inf)), limit


@pytest.mark.parametrize("request_name, parse, base", [COMPLETION, CHAT], ids=["completion", "chat"])
def test_every_stated_bound_is_the_one_the_readers_hold(document, request_name, parse, base):
    """At each minimum/maximum the schema states, the value on the bound is accepted (by SamplingParams
    too) and the nearest value past it is refused, naming the field."""
    checked = 0
    for name, field_schema in fields(request_name, document):
        for key, limit, kind in bounds(field_schema):
            inside, outside = just_past(key, limit, kind)
            body = {**base, name: inside, **({"n": inside} if name == "best_of" else {}),  # best_of must be n
                    **({"echo": True} if (request_name, name, inside) == ("CompletionRequest", "max_tokens", 0) else {})}
            assert refusal(parse, body) is None, (name, key, inside, refusal(parse, body).message)
            error = refusal(parse, {**base, name: outside})
            assert error is not None and error.param == name, (name, key, outside)
            checked += 1
    assert checked >= 12
