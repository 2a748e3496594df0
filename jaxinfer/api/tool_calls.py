"""Tool calling: a request's `tools` and `tool_choice` checked, the grammar that makes `required` and a
named function certain, and the Hermes format parsed out of the model's text as it streams.

The Hermes format (NousResearch's Hermes models, Qwen2.5's chat template) writes each call as
`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`. A model's format is known from its chat
template; a template that does not write `<tool_call>` gets no tools (the request is refused).

`auto` leaves the model free and parses what it writes; `required` and a named function constrain
the text (jaxinfer/structured_outputs.py) to one or more calls whose arguments follow the tool's
JSON schema, so they always parse; `none` renders no tools and parses nothing.
"""

import json
import re
import uuid
from dataclasses import dataclass, field

from jaxinfer.api.errors import APIError, short_repr
from jaxinfer.sampling import StructuredOutputsParams

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
MAX_TOOLS = 128
TOOL_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")  # OpenAI's: letters, digits, _ and -, at most 64 (we allow more)
# JSON as the constraint writes it: no free whitespace (structured_outputs.JSON_OPTIONS).
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it

    def openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(slots=True)
class ToolCallDelta:
    """A piece of a streamed call: the first of each call has its id and name, the rest argument text."""

    index: int  # of the call in this choice
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def openai(self) -> dict:
        delta = {"index": self.index}
        if self.id is not None:
            delta.update(id=self.id, type="function")
        function = {"arguments": self.arguments}
        if self.name is not None:
            function["name"] = self.name
        delta["function"] = function
        return delta


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


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
                and isinstance(function.get("arguments"), str)):
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


# -- the parser ---------------------------------------------------------------------------------

_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')


class HermesParser:
    """Splits a choice's text, fed as it streams, into content and tool calls. The same object parses
    a whole text (feed it once, then finish), so streamed and whole answers are the same calls.

    Inside a call the name is handed out once `{"name": "...", "arguments": ` has arrived, then the
    arguments' JSON text as it comes, as the model writes it, up to its closing brace. A call written
    another way is handed out whole at `</tool_call>`; one that is not a JSON call at all is content.
    Whitespace is held back until more content follows it: around calls it is dropped. An answer
    that is one bare JSON call (no tags) is a call too.
    """

    def __init__(self):
        self.calls: list[ToolCall] = []
        self._buffer = ""  # text received, not yet handed out
        self._in_call = False
        self._arguments_at = None  # streaming a call's arguments: where the scan stands in the buffer
        self._depth, self._in_string, self._escaped = 0, False, False
        self._call_done = False  # the arguments closed: waiting for </tool_call>
        self._handed_out = False  # some content was handed out

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self._buffer += text
        content, deltas = [], []
        while self._step(content, deltas):
            pass
        content = "".join(content)
        self._handed_out = self._handed_out or bool(content)
        return content, deltas

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """The end of the text: a call left open is a call if its JSON is whole, else its text is content."""
        content, deltas = [], []
        bare = _whole_call(self._buffer) if not self._in_call and self._may_be_bare_call(self._buffer) else None
        if bare is not None:
            deltas += self._add_call(*bare)
        elif not self._in_call:
            if self._buffer.strip() or not self.calls:
                content.append(self._buffer)
        elif self._arguments_at is None and not self._call_done:
            call = _whole_call(self._buffer)
            if call is not None:
                deltas += self._add_call(*call)
            else:
                content.append(TOOL_CALL_START + self._buffer)
        self._buffer = ""
        return "".join(content), deltas

    def _step(self, content: list, deltas: list) -> bool:
        """Hands out what the buffer settles; whether it should be called again."""
        buffer = self._buffer
        if not self._in_call:
            start = buffer.find(TOOL_CALL_START)
            if start < 0 and self._may_be_bare_call(buffer):
                return False  # held: the whole answer may be one call written without the tags
            if start >= 0:
                content.append(buffer[:start].rstrip())  # whitespace before a call is dropped
                self._buffer, self._in_call = buffer[start + len(TOOL_CALL_START):], True
                return True
            # Hand out all but a possible start of "<tool_call>" and trailing whitespace.
            keep = len(buffer) - partial_suffix(buffer, TOOL_CALL_START)
            settled = buffer[:keep]
            if settled.strip():
                cut = len(settled.rstrip())
                content.append(buffer[:cut])
                self._buffer = buffer[cut:]
            return False
        if self._arguments_at is None and not self._call_done:
            header = _HEADER.match(buffer)
            if header and buffer[header.end():header.end() + 1] == "{":
                name = json.loads(header.group(1))
                deltas += self._add_call(name, "")
                self._buffer = buffer[header.end():]
                self._arguments_at, self._depth, self._in_string, self._escaped = 0, 0, False, False
                return True
            end = buffer.find(TOOL_CALL_END)
            if end >= 0:  # a call written another way, or no call at all
                call = _whole_call(buffer[:end])
                if call is not None:
                    deltas += self._add_call(*call)
                else:
                    content.append(TOOL_CALL_START + buffer[:end + len(TOOL_CALL_END)])
                self._buffer, self._in_call = buffer[end + len(TOOL_CALL_END):], False
                return True
            return False
        if self._arguments_at is not None:
            closed_at = self._scan()
            upto = closed_at if closed_at is not None else self._arguments_at
            if upto:
                deltas.append(ToolCallDelta(len(self.calls) - 1, arguments=buffer[:upto]))
                self.calls[-1].arguments += buffer[:upto]
                self._buffer = buffer[upto:]
            self._arguments_at = None if closed_at is not None else 0
            self._call_done = closed_at is not None
            return closed_at is not None
        end = buffer.find(TOOL_CALL_END)  # after the arguments: `}` and the end tag
        if end >= 0:
            self._buffer, self._in_call, self._call_done = buffer[end + len(TOOL_CALL_END):], False, False
            return True
        return False

    def _may_be_bare_call(self, buffer: str) -> bool:
        """Whether the answer so far may be one call written as bare JSON, `{"name": ...}` without the
        tags (small models, Qwen2.5-Coder-0.5B among them, do that): nothing handed out yet and the
        text starts like one. It is then held back to the end and parsed whole."""
        if self._handed_out or self.calls:
            return False
        compact = re.sub(r"\s+", "", buffer[:64])
        return compact.startswith('{"name":') or '{"name":'.startswith(compact)

    def _scan(self) -> int | None:
        """Walks the arguments' JSON from `_arguments_at`: the end of the object if it closed (then the
        scan stops there), else None with `_arguments_at` at the end of the buffer."""
        buffer = self._buffer
        i = self._arguments_at
        while i < len(buffer):
            c = buffer[i]
            i += 1
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif c == "\\":
                    self._escaped = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i
        self._arguments_at = i
        return None

    def _add_call(self, name: str, arguments: str) -> list[ToolCallDelta]:
        call = ToolCall(new_call_id(), name, arguments)
        self.calls.append(call)
        return [ToolCallDelta(len(self.calls) - 1, call.id, name, arguments)]


def _whole_call(text: str) -> tuple[str, str] | None:
    """(name, arguments as JSON text) of a call written as one JSON object, or None."""
    try:
        call = json.loads(text)
    except ValueError:
        return None
    if not (isinstance(call, dict) and isinstance(call.get("name"), str)):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    if set(call) - {"name", "arguments", "parameters"} or not isinstance(arguments, dict):
        return None
    return call["name"], json.dumps(arguments, ensure_ascii=False)


def partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that `marker` starts with (a marker still arriving)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
