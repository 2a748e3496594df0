"""Admission by expected wait: how long a request submitted now would wait for its first token.

The AsyncLLMEngine refuses a request at submission when this passes `max_queue_wait` (the server's
--max-queue-wait, 503 + Retry-After), so that under overload a request gets either its first token
within about the limit or a refusal at once, not a minute of silence.

expected wait = (prefill tokens ahead + the request's own prompt tokens) / prefill rate

- Tokens ahead (`Scheduler.num_queued_tokens`, plus the prompts of requests submitted but not yet
  handed to the engine): every waiting sequence's uncomputed tokens and the rest of the prompts
  being prefilled. The scheduler admits in arrival order, so a request that comes later never
  delays this one.
- Prefill rate (`PrefillRate`, measured on the engine's loop thread): prompt tokens computed per
  second of loop time, over the loop iterations that began with tokens queued, exponentially
  weighted over the last WINDOW_S seconds of such time. The decode rows sharing those steps, and
  steps that admit nothing (the batch full, no free page), count as time in which the queue did not
  drain: it is the rate at which the queue actually drains, not the model's peak prefill speed.

It errs on the side of refusing: tokens ahead count no prefix-cache hit (but the siblings of an
`n` > 1 request, which wait to share the first sequence's prompt pages, count only the last page); a
text prompt not yet tokenized counts its UTF-8 bytes (byte-level BPE makes at most one token per
byte; a few special tokens are within the slack); and the rate includes the loop's own overhead.

Before the first measurement the rate is a prior (`prior_tokens_per_s`): PRIOR_FRACTION of the
largest step's tokens per second, timed once at warm-up (`ModelRunner.peak_prefill_tokens_per_s`:
padding tokens, so no attention over a long context and no decode rows sharing the step), or
PRIOR_TOKENS_PER_S where the engine was not warmed up. It counts as PRIOR_WEIGHT_S of measured time
and gives way to measurements within a few seconds of work. (A fixed 100 tokens/s made a fresh
server refuse most of a first burst that it would have served in seconds.) A request with nothing
ahead of it is always admitted: retrying could never make it wait less.
"""

import math
from dataclasses import dataclass

PRIOR_TOKENS_PER_S = 100.0  # without a warm-up timing: below what SmolLM2-135M prefills on 2 busy cores
PRIOR_FRACTION = 0.5  # of the warm-up's peak: the queue drains slower than the model's peak prefill
PRIOR_WEIGHT_S = 0.5  # the prior counts as this much measured time, then decays like a measurement
WINDOW_S = 5.0  # seconds of loop time over which measurements are weighted (time constant)


@dataclass(slots=True)
class PrefillRate:
    """Prompt tokens computed per second of loop time: a time-weighted exponential moving average
    (tokens and seconds each decayed by exp(-dt / window_s), their ratio the rate)."""

    tokens: float = PRIOR_TOKENS_PER_S * PRIOR_WEIGHT_S
    seconds: float = PRIOR_WEIGHT_S
    window_s: float = WINDOW_S

    @classmethod
    def prior(cls, tokens_per_s: float) -> "PrefillRate":
        return cls(tokens_per_s * PRIOR_WEIGHT_S, PRIOR_WEIGHT_S)

    def observe(self, num_tokens: int, seconds: float) -> None:
        """One loop iteration that began with tokens queued: `num_tokens` prefill tokens in `seconds`."""
        decay = math.exp(-seconds / self.window_s)
        self.tokens = self.tokens * decay + num_tokens
        self.seconds = self.seconds * decay + seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def prior_tokens_per_s(peak_tokens_per_s: float | None) -> float:
    """The rate admission starts from: PRIOR_FRACTION of the warm-up's peak, else PRIOR_TOKENS_PER_S."""
    return PRIOR_FRACTION * peak_tokens_per_s if peak_tokens_per_s else PRIOR_TOKENS_PER_S


def expected_wait(tokens_ahead: int, num_prompt_tokens: int, tokens_per_s: float) -> float:
    """Seconds until the first token of a request with `num_prompt_tokens` behind `tokens_ahead`
    (infinite once a queue that does not drain has decayed the rate to nothing)."""
    tokens = tokens_ahead + num_prompt_tokens
    if tokens == 0:
        return 0.0
    return tokens / tokens_per_s if tokens_per_s > 0 else math.inf


def refuses(tokens_ahead: int, wait: float, max_queue_wait: float | None) -> bool:
    """Whether a request expected to wait `wait` seconds is refused (max_queue_wait 0 or None: never)."""
    return bool(max_queue_wait) and tokens_ahead > 0 and wait > max_queue_wait


def retry_after(wait: float, max_queue_wait: float) -> int:
    """Seconds a refused request should wait before retrying: until the queue ahead has drained
    enough for it to fit (wait - limit), at least 1 and at most the limit, by when every request
    admitted ahead of it has had its first token and the estimate is a new one."""
    return max(1, math.ceil(min(wait - max_queue_wait, max_queue_wait)))


def num_prompt_tokens(prompt: str | list[int]) -> int:
    """A token-id prompt's length; a text prompt's UTF-8 bytes (at least its tokens, before any special one)."""
    return len(prompt) if not isinstance(prompt, str) else len(prompt.encode("utf-8", "surrogatepass"))
