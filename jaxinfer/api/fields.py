"""Request fields as JSON Schema, and their readers: the schema builders the API modules declare their
fields with (published by /openapi.json), and `read_field` / `refuse_not_implemented`, which check
a body against those declarations. A wrong type or value is an `APIError` (400) naming the field.
"""

import json
import math
import operator

from jaxinfer.api.errors import APIError, short_repr


def integer_field(description: str, **bounds) -> dict:
    return {"type": "integer", "description": description, **bounds}


def number_field(description: str, **bounds) -> dict:
    return {"type": "number", "description": description, **bounds}


def boolean_field(description: str, **default) -> dict:
    return {"type": "boolean", "description": description, **default}


def not_implemented(unused, what: str) -> dict:
    """A field refused unless it holds `unused`, the value that asks for nothing."""
    return {"const": unused, "x-not-implemented": what,
            "description": f"Not implemented ({what}): only {json.dumps(unused)} or null is accepted."}


def nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


# -- field readers ------------------------------------------------------------------------------

def bad(name: str, expected: str, value) -> APIError:
    return APIError(400, f"'{name}' must be {expected}, got {short_repr(value)}", param=name)


def is_int(x) -> bool:
    """An integer as JSON Schema (and vLLM's pydantic) counts one: 3 or 3.0, not true; read with int()."""
    return isinstance(x, int) and not isinstance(x, bool) or isinstance(x, float) and x.is_integer()


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_finite(x) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an integer past float's range
        return False


_KINDS = {"integer": (is_int, "an integer"), "number": (lambda x: is_number(x) and _is_finite(x), "a finite number"),
          "boolean": (lambda x: isinstance(x, bool), "a boolean"), "string": (lambda x: isinstance(x, str), "a string")}
_BOUNDS = (("minimum", ">=", operator.ge), ("exclusiveMinimum", ">", operator.gt),
           ("maximum", "<=", operator.le), ("exclusiveMaximum", "<", operator.lt))


def read_field(body: dict, fields: dict, name: str, default=None):
    """`body[name]`, checked against the scalar schema `fields[name]`; `default` if absent or null."""
    value = body.get(name)
    if value is None:
        return default
    schema = fields[name]
    is_kind, expected = _KINDS[schema["type"]]
    bounds = [(word, schema[key], holds) for key, word, holds in _BOUNDS if key in schema]
    ok = is_kind(value) and all(holds(value, limit) for _, limit, holds in bounds)
    if schema.get("minLength"):
        expected, ok = "a non-empty string", ok and len(value) >= schema["minLength"]
    if not ok:
        limits = " and ".join(f"{word} {limit}" for word, limit, _ in bounds)
        raise bad(name, f"{expected} {limits}".rstrip(), value)
    if schema["type"] == "integer":
        return int(value)  # 3.0 is 3
    return float(value) if schema["type"] == "number" else value


def _same_json(value, expected) -> bool:
    return type(value) is type(expected) and value == expected


def refuse_not_implemented(body: dict, fields: dict) -> None:
    for name, schema in fields.items():
        value = body.get(name)
        if "x-not-implemented" in schema and value is not None and not _same_json(value, schema["const"]):
            raise APIError(400, f"'{name}' is not supported: {schema['x-not-implemented']} is not implemented",
                           param=name)
