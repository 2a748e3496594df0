"""Reasoning content: the `<think>...</think>` part of a thinking model's answer handed out apart from
its content (vLLM's `reasoning_content`), as it streams.

A model thinks if its chat template knows `</think>`. Templates differ on who writes `<think>`: the
DeepSeek-R1 distills' generation prompt ends with it (the answer starts inside the reasoning and only
`</think>` appears), Qwen3's leaves it to the model. `ThinkFormat.from_template` tells which by
rendering a generation prompt; an answer that opens with `<think>` enters the reasoning either way.
"""

from dataclasses import dataclass

from jaxinfer.api.hermes import partial_suffix

THINK_START, THINK_END = "<think>", "</think>"


@dataclass(frozen=True, slots=True)
class ThinkFormat:
    starts_in_reasoning: bool  # the generation prompt opened `<think>` already

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "ThinkFormat | None":
        """The model's format, or None if its template has no reasoning."""
        template = tokenizer.chat_template
        if not template or THINK_END not in template:
            return None
        try:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True)
        except Exception:  # a template that wants more than one user message: assume the model opens it
            return cls(False)
        return cls.from_prompt(prompt)

    @classmethod
    def from_prompt(cls, prompt: str) -> "ThinkFormat":
        """A rendered generation prompt's format: the answer starts in the reasoning if the prompt opened it."""
        return cls(prompt.rstrip().endswith(THINK_START))


class ReasoningParser:
    """Splits a choice's text, fed as it streams, into (reasoning, content). A tag arriving in pieces
    is held back until it is whole or is not a tag after all."""

    def __init__(self, think_format: ThinkFormat):
        self._in_reasoning = think_format.starts_in_reasoning
        self._may_open = not think_format.starts_in_reasoning  # `<think>` opens only at the start
        self._buffer = ""
        self.reasoning, self.content = "", ""

    def feed(self, text: str) -> tuple[str, str]:
        self._buffer += text
        reasoning, content = "", ""
        if self._may_open:
            stripped = self._buffer.lstrip()
            if stripped.startswith(THINK_START):
                self._buffer, self._in_reasoning, self._may_open = stripped[len(THINK_START):], True, False
            elif THINK_START.startswith(stripped):
                return "", ""  # maybe `<think>` still arriving
            else:
                self._may_open = False
        if self._in_reasoning:
            end = self._buffer.find(THINK_END)
            if end >= 0:
                reasoning, self._buffer = self._buffer[:end], self._buffer[end + len(THINK_END):]
                self._in_reasoning = False
            else:
                keep = partial_suffix(self._buffer, THINK_END)
                reasoning, self._buffer = self._buffer[:len(self._buffer) - keep], self._buffer[len(self._buffer) - keep:]
        if not self._in_reasoning:
            content, self._buffer = self._buffer, ""
        self.reasoning += reasoning
        self.content += content
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """The end: text held back (a tag that never completed) goes where it was."""
        rest, self._buffer = self._buffer, ""
        if self._in_reasoning:
            self.reasoning += rest
            return rest, ""
        self.content += rest
        return "", rest


