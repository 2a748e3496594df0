"""Tool calling, the request's side: `tools` and `tool_choice` checked, what the chat template renders,
and the grammar that makes `required` and a named function certain.

The calls are read in the Hermes format (jaxinfer/api/hermes.py), which Qwen2.5's chat template asks
for. A model's format is known from its chat template; a template that does not write `<tool_call>`
gets no tools (the request is refused).

`auto` leaves the model free and parses what it writes; `required` and a named function constrain
the text (jaxinfer/structured_outputs.py) to one or more calls whose arguments follow the tool's
JSON schema, so they always parse; `none` renders no tools and parses nothing.
"""

import json
import re
from dataclasses import dataclass, field

from jaxinfer.api.errors import APIError, short_repr
from jaxinfer.api.hermes import TOOL_CALL_END, TOOL_CALL_START
from jaxinfer.sampling import StructuredOutputsParams

MAX_TOOLS = 128
TOOL_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")  # OpenAI's: letters, digits, _ and -, at most 64 (we allow more)
# JSON as the constraint writes it: no free whitespace (structured_outputs.JSON_OPTIONS).
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


# -- the request --------------------------------------------------------------------------------

@dataclass(slots=True)
class ToolRequest:
    """Checked tools (OpenAI's chat shape) and tool choice: mode "none", "auto" or "required", and with
    mode "required" maybe the one function to call."""

    tools: list[dict] = field(default_factory=list)
    mode: str = "none"
    function: str | None = None
    parallel: bool = True  # with mode "required" and no function: more than one call allowed

    @property
    def parses_calls(self) -> bool:
        return self.mode != "none"

    def template_tools(self) -> list[dict] | None:
        """What the chat template renders: no tools when none may be called."""
        return self.tools if self.tools and self.mode != "none" else None


def check_tools(tools, param: str = "tools") -> list[dict]:
    """OpenAI's chat `tools`: [{"type": "function", "function": {"name", "description"?, "parameters"?}}]."""

    def chat_tool(tool, where: str) -> dict:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not (isinstance(tool, dict) and tool.get("type") == "function" and isinstance(function, dict)):
            raise APIError(400, f"{where} must be {{'type': 'function', 'function': {{...}}}}, got "
                           f"{short_repr(tool)}", param=where)
        return check_function(function, f"{where}.function")

    return check_tool_list(tools, chat_tool, param)


def check_tool_list(tools, check_tool, param: str = "tools") -> list[dict]:
    """A request's tools, each made an OpenAI chat tool by `check_tool(tool, where)` (each API has its
    own shape of a tool): a list of at most MAX_TOOLS, their names unique."""
    if not isinstance(tools, list):
        raise APIError(400, f"'{param}' must be a list of tools, got {short_repr(tools)}", param=param)
    if len(tools) > MAX_TOOLS:
        raise APIError(400, f"at most {MAX_TOOLS} tools per request, got {len(tools)}", param=param)
    checked, names = [], set()
    for i, tool in enumerate(tools):
        where = f"{param}[{i}]"
        checked.append(check_tool(tool, where))
        name = checked[-1]["function"]["name"]
        if name in names:
            raise APIError(400, f"{where}: two tools are named {name!r}", param=where)
        names.add(name)
    return checked


def check_function(function: dict, where: str, parameters_key: str = "parameters") -> dict:
    """One function definition ({name, description?, parameters?}) as an OpenAI chat tool."""
    name = function.get("name")
    if not (isinstance(name, str) and TOOL_NAME.match(name)):
        raise APIError(400, f"{where}.name must be 1-128 letters, digits, '_', '.', ':' or '-', got "
                       f"{short_repr(name)}", param=f"{where}.name")
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise APIError(400, f"{where}.description must be a string", param=f"{where}.description")
    parameters = function.get(parameters_key)
    if parameters is not None and not isinstance(parameters, dict):
        raise APIError(400, f"{where}.{parameters_key} must be a JSON schema (an object)",
                       param=f"{where}.{parameters_key}")
    tool = {"name": name}
    if description is not None:
        tool["description"] = description
    tool["parameters"] = parameters if parameters is not None else {"type": "object", "properties": {}}
    return {"type": "function", "function": tool}


def check_tool_choice(choice, tools: list[dict], param: str = "tool_choice") -> ToolRequest:
    """OpenAI's chat `tool_choice`: "none", "auto", "required" or {"type": "function", "function": {"name"}}.
    Without it: "auto" when there are tools, else "none"."""
    if choice is None:
        return ToolRequest(tools, "auto" if tools else "none")
    if isinstance(choice, str) and choice in ("none", "auto", "required"):
        if choice != "none" and not tools:
            raise APIError(400, f"'{param}' is {choice!r} but the request has no tools", param=param)
        return ToolRequest(tools, choice)
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) and choice.get("type") == "function" \
        and isinstance(choice.get("function"), dict) else None
    if name is None:
        raise APIError(400, f"'{param}' must be 'none', 'auto', 'required' or {{'type': 'function', 'function': "
                       f"{{'name': ...}}}}, got {short_repr(choice)}", param=param)
    return named_choice(name, tools, param)


def named_choice(name, tools: list[dict], param: str) -> ToolRequest:
    names = [t["function"]["name"] for t in tools]
    if name not in names:
        raise APIError(400, f"'{param}' names the function {short_repr(name)}, which is not among the tools "
                       f"({', '.join(names) or 'none given'})", param=param)
    return ToolRequest(tools, "required", name)


def template_message_tool_calls(tool_calls, where: str) -> list[dict]:
    """An assistant message's OpenAI `tool_calls` as chat templates take them: `arguments` parsed into
    an object (templates write it with `tojson`), as vLLM and transformers do."""
    if not isinstance(tool_calls, list):
        raise APIError(400, f"{where} must be a list of tool calls", param=where)
    calls = []
    for i, call in enumerate(tool_calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)
                and isinstance(function.get("arguments"), str)
                and isinstance(call.get("id", ""), str) and call.get("type", "function") == "function"):
            raise APIError(400, f"{where}[{i}] must be {{'id', 'type': 'function', 'function': {{'name', "
                           f"'arguments' (JSON text)}}}}, got {short_repr(call)}", param=f"{where}[{i}]")
        calls.append(template_tool_call(call.get("id"), function["name"], function["arguments"], f"{where}[{i}]"))
    return calls


def template_tool_call(call_id, name: str, arguments, where: str) -> dict:
    """One call as chat templates take it; `arguments` JSON text or an already parsed object."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            raise APIError(400, f"{where}: the arguments are not JSON: {short_repr(arguments)}", param=where) from None
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


# -- the constraint -----------------------------------------------------------------------------

def supports_tools(chat_template: str | None) -> bool:
    """Whether the model's chat template writes Hermes tool calls (the only format parsed here)."""
    return bool(chat_template) and TOOL_CALL_START in chat_template


def constraint(request: ToolRequest, tokenizer) -> StructuredOutputsParams | None:
    """For `required` (or a named function): the text is one or more Hermes calls (one: exactly that
    function), each `{"name": ..., "arguments": ...}` with the arguments following the tool's schema."""
    if request.mode != "required":
        return None
    tools = [t for t in request.tools if request.function in (None, t["function"]["name"])]
    defs, alternatives = {}, []
    for i, tool in enumerate(tools):
        parameters = _hoist_defs(tool["function"]["parameters"], f"tool{i}_", defs)
        alternatives.append({"type": "object", "properties": {"name": {"const": tool["function"]["name"]},
                                                              "arguments": parameters},
                             "required": ["name", "arguments"], "additionalProperties": False})
    schema = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
    schema = {**schema, "x-guidance": _JSON_STYLE, **({"$defs": defs} if defs else {})}
    call = f'{_lark_literal(tokenizer, TOOL_CALL_START)} "\\n" %json {json.dumps(schema)} "\\n" ' \
           f'{_lark_literal(tokenizer, TOOL_CALL_END)}'
    repeat = ' ("\\n" call)*' if request.parallel and not request.function else ""
    # The model may end its line before it ends its turn (Qwen2.5 does): a closing newline is allowed.
    return StructuredOutputsParams(grammar=f'start: call{repeat} "\\n"?\ncall: {call}\n')


def _lark_literal(tokenizer, text: str) -> str:
    """`text` in llguidance's Lark: a token reference where the tokenizer has it as one added token
    (llguidance never matches an added token's bytes as text), else a string."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) == 1 and tokenizer.decode(ids, skip_special_tokens=False) == text:
        return f"<[{ids[0]}]>"
    return json.dumps(text)


def _hoist_defs(schema: dict, prefix: str, defs: dict) -> dict:
    """`schema` with its `$defs`/`definitions` moved into `defs` under `prefix` and its `#/...` refs
    renamed to match, so it can sit inside a larger schema."""
    schema = dict(schema)
    local = {**schema.pop("definitions", {}), **schema.pop("$defs", {})}

    def rename(node):
        if isinstance(node, dict):
            out = {k: rename(v) for k, v in node.items()}
            ref = out.get("$ref")
            if isinstance(ref, str) and (ref.startswith("#/$defs/") or ref.startswith("#/definitions/")):
                out["$ref"] = "#/$defs/" + prefix + ref.split("/", 2)[2]
            elif isinstance(ref, str) and ref == "#":
                raise APIError(400, "a tool's parameters refer to their own root ('$ref': '#'), which is not "
                               "supported", param="tools")
            return out
        if isinstance(node, list):
            return [rename(v) for v in node]
        return node

    for name, definition in local.items():
        defs[prefix + name] = rename(definition)
    return rename(schema)
