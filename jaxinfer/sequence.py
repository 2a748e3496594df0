"""A sequence being generated: its tokens, its pages, and how far the cache has computed it."""

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from jaxinfer.sampling import SamplingParams

if TYPE_CHECKING:
    from llguidance import LLMatcher


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int  # the params' seed, or one drawn for this sequence: its random draws depend on nothing else
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)  # pages, in order of position
    page_hashes: list[bytes] = field(default_factory=list)  # prefix-cache digests of its full pages
    cache_salt: str | None = None  # only requests with the same salt share prefix-cache pages
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_draft_computed: int | None = None  # a draft model's: tokens whose K/V are in its cache (jaxinfer.draft_model)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    arrival_time: float = field(default_factory=time.monotonic)
    # n > 1: the siblings wait for the first sequence's prompt to be cached, then share its pages.
    wait_for: "Sequence | None" = None
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at (first) admission
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    last_token_time: float = 0.0
    # Structured outputs: the grammar's state after output_ids (jaxinfer/structured_outputs.py).
    matcher: "LLMatcher | None" = None
    # prompt_logprobs: the next prompt token whose logprob is still wanted (None: none is)
    next_scored: int | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_ids(self, start: int = 0, stop: int | None = None) -> list[int]:
        """Prompt and output tokens [start, stop), copying only those (a decode row's is one token)."""
        n = len(self.prompt_ids)
        if stop is not None and stop <= n:
            return self.prompt_ids[start:stop]
        if start >= n:
            return self.output_ids[start - n:None if stop is None else stop - n]
        return self.prompt_ids[start:] + self.output_ids[:None if stop is None else stop - n]

    @property
    def num_prefill_tokens_left(self) -> int:
        """Tokens to compute before the next one can be sampled, beyond a decode row's one: the rest
        of the prompt or, after a preemption, of prompt and output but the last token."""
        return max(0, self.num_tokens - self.num_computed_tokens - (1 if self.output_ids else 0))

    @property
    def scoring(self) -> bool:
        """Some prompt token's logprob is still wanted (prompt_logprobs): the prompt is computed, not
        read from the prefix cache."""
        return self.next_scored is not None and self.next_scored < len(self.prompt_ids)

    def score_rows(self, num_new: int) -> tuple[int, int]:
        """(first, count): the prompt tokens whose logprobs a chunk of `num_new` tokens from
        num_computed_tokens gives, each from the logits of the position before it."""
        if not self.scoring:
            return 0, 0
        first = max(self.num_computed_tokens + 1, self.next_scored)
        last = min(self.num_computed_tokens + num_new, len(self.prompt_ids) - 1)
        return first, max(0, last - first + 1)

    def fit_score_rows(self, num_new: int, rows: int) -> int:
        """The longest chunk of at most `num_new` tokens whose prompt logprobs take at most `rows`
        rows (0: not even one token fits)."""
        first, count = self.score_rows(num_new)
        if count <= rows:
            return num_new
        return first - 1 + rows - self.num_computed_tokens

    @property
    def prompt_computed(self) -> bool:
        return self.num_computed_tokens >= len(self.prompt_ids)

    @property
    def last_token_id(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED
