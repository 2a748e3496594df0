"""What the engine hands out for a request (RequestOutput, CompletionOutput, RequestMetrics), and
the stop-string search that decides how much of a sequence's text may be handed out."""

from dataclasses import dataclass, field

from jaxinfer.sampling import TokenLogprob


@dataclass(slots=True)
class CompletionOutput:
    """One sequence of a request: everything so far (text, token_ids, logprobs) and what is new since
    the request's previous output (the delta fields). Every list is the output's own: the engine
    never touches it again. In a delta-only output (`LLMEngine.step(deltas_only=True)`, what the
    AsyncLLMEngine hands across threads) text, token_ids and logprobs are None."""

    index: int
    text: str | None
    token_ids: list[int] | None
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    delta: str = ""  # text new since the previous output (streaming)
    delta_token_ids: list[int] = field(default_factory=list)  # tokens new since the previous output
    logprobs: list[TokenLogprob] | None = None  # per generated token, when SamplingParams.logprobs is set
    delta_logprobs: list[TokenLogprob] | None = None  # those of delta_token_ids


@dataclass(slots=True)
class RequestMetrics:
    """Times are time.monotonic() seconds."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_preemptions: int = 0
    inter_token_latencies: list[float] = field(default_factory=list)  # seconds between a sequence's tokens

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    # SamplingParams.prompt_logprobs: None for the first prompt token, then each one's logprob, rank and
    # top alternatives; None until all are computed (and in a delta-only output, after the first with them)
    prompt_logprobs: list[TokenLogprob | None] | None = None


def find_stop(text: str, stops: list[str], searched: int) -> int | None:
    """Where the first stop string in `text` starts, given that `text[:searched]` holds none: only
    the new text and the (longest stop - 1) characters before it are searched."""
    start = max(0, searched - max(len(s) for s in stops) + 1)
    hits = [h for h in (text.find(s, start) for s in stops) if h >= 0]
    return min(hits) if hits else None


def stop_prefix_start(text: str, stops: list[str]) -> int:
    """Where the longest end of `text` that a stop string starts with begins (len(text): none):
    what a stream holds back, as it could still turn into a stop."""
    start = len(text)
    for stop in stops:
        p = text.find(stop[0], max(0, len(text) - len(stop) + 1))
        while 0 <= p < start:
            if stop.startswith(text[p:]):
                start = p  # the earliest match is this stop's longest
                break
            p = text.find(stop[0], p + 1)
    return start
