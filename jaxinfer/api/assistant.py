"""A choice's text as an assistant message: reasoning, content and tool calls, parsed as it streams.
reasoning.py splits off the thinking; tool_calls.py finds the calls in the rest. Every API (chat
completions, Responses, Anthropic Messages) reads a model's answer through this one parser.
"""

import dataclasses
from dataclasses import dataclass, field

from jaxinfer.api.reasoning import ReasoningParser, ThinkFormat
from jaxinfer.api.hermes import HermesParser, ToolCall, ToolCallDelta
from jaxinfer.api.tool_calls import supports_tools


@dataclass(frozen=True, slots=True)
class OutputFormat:
    """What a model's answers hold beyond text, read from its chat template once per server."""

    tool_calls: bool  # the template writes Hermes `<tool_call>`s
    think: ThinkFormat | None  # the model thinks in `<think>...</think>`

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "OutputFormat":
        """A tokenizer without a chat template (or none at all, as test stand-ins have): plain text."""
        if getattr(tokenizer, "chat_template", None) is None:
            return cls(False, None)
        return cls(supports_tools(tokenizer.chat_template), ThinkFormat.from_tokenizer(tokenizer))

    def for_prompt(self, prompt: str) -> "OutputFormat":
        """This format for one rendered chat prompt: whether the answer starts inside the reasoning is
        read from the prompt itself, which a request's chat_template_kwargs may have changed (Qwen3's
        enable_thinking=false closes an empty `<think></think>` in it)."""
        if self.think is None:
            return self
        return dataclasses.replace(self, think=ThinkFormat.from_prompt(prompt))


@dataclass(slots=True)
class AssistantDelta:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)


class AssistantParser:
    """One choice's parser. Feed it the text deltas, then `finish()`; `content`, `reasoning` and
    `tool_calls` hold the whole answer so far. With neither reasoning nor tool calls it passes text
    through as content."""

    def __init__(self, output_format: OutputFormat, parse_tool_calls: bool):
        self._reasoning = ReasoningParser(output_format.think) if output_format.think else None
        self._tools = HermesParser() if parse_tool_calls else None
        self.content, self.reasoning = "", ""

    @property
    def tool_calls(self) -> list[ToolCall]:
        return self._tools.calls if self._tools else []

    def feed(self, text: str) -> AssistantDelta:
        reasoning, content = self._reasoning.feed(text) if self._reasoning else ("", text)
        return self._content(reasoning, content, finish=False)

    def finish(self) -> AssistantDelta:
        reasoning, content = self._reasoning.finish() if self._reasoning else ("", "")
        return self._content(reasoning, content, finish=True)

    def finish_reason(self, engine_reason: str | None) -> str | None:
        """OpenAI's: "tool_calls" when the answer ended by itself after calling tools."""
        return "tool_calls" if engine_reason == "stop" and self.tool_calls else engine_reason

    def _content(self, reasoning: str, content: str, finish: bool) -> AssistantDelta:
        calls = []
        if self._tools:
            content, calls = self._tools.feed(content)
            if finish:
                more, more_calls = self._tools.finish()
                content, calls = content + more, calls + more_calls
        self.content += content
        self.reasoning += reasoning
        return AssistantDelta(content, reasoning, calls)
