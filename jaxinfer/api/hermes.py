"""The Hermes tool-call format parsed out of a model's text as it streams: NousResearch's Hermes
models and Qwen2.5's chat template write each call as `<tool_call>\n{"name": ..., "arguments":
{...}}\n</tool_call>` (the requests' side of tool calling: jaxinfer/api/tool_calls.py)."""

import json
import re
import uuid
from dataclasses import dataclass

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"


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
