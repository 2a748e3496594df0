"""A stand-in for LLMEngine with the same surface, for tests of the machinery around it (no model).

Each step gives every sequence of every request one more token until it has `params.max_tokens`:
token i of sequence j (of `params.n`) is 1000 * j + i, its text one letter ("x" for sequence 0, "y"
for 1, ...) and, with `params.logprobs`, its logprob -i / 10. It records which thread called it, can
be slowed down, and fails a step when told to or when it holds the prompt POISON. It has the
attributes the server and the CLI read (limits, buckets, sizes). For admission by expected wait its
scheduler reports `queued_tokens` as the prefill tokens queued, which each step computes
`prefill_tokens_per_step` of (set both; the requests themselves queue nothing).
"""

import collections
import string
import threading
import time
from types import SimpleNamespace

from jaxinfer.engine import CompletionOutput, RequestOutput
from jaxinfer.sampling import TokenLogprob

POISON = [6, 6, 6]  # a prompt that makes the next step fail


class FakeEngine:
    def __init__(self, step_seconds: float = 0.0, max_model_len: int = 512):
        self.step_seconds = step_seconds
        self.requests: dict[str, list] = {}  # request_id -> [params, generated token ids]
        self.calling_threads: set[int] = set()
        self.num_steps = 0
        self.num_calls = 0
        self.aborted: list[str] = []
        self.fail_next_step = False
        self.queued_tokens = 0
        self.prefill_tokens_per_step = 0
        self.scheduler = SimpleNamespace(running=[], waiting=collections.deque(), num_preemptions=0,
                                         num_prefill_tokens=0, num_queued_tokens=lambda: self.queued_tokens)
        self.allocator = SimpleNamespace(num_pages=64, num_free_pages=64, prefix_cache_hits=0,
                                         prefix_cache_queries=0)
        self.runner = SimpleNamespace(num_compilations=0, num_pages=64, warmed_up=True,
                                      buckets=lambda: [(16, 8)])
        self.config = SimpleNamespace(max_model_len=max_model_len, page_size=16, max_num_seqs=8,
                                      max_num_batched_tokens=128)
        self.model_config = SimpleNamespace(name="fake", vocab_size=1000, architecture="fake", num_layers=1)
        self.dtype, self.weight_bytes, self.kv_cache_bytes = "float32", 0, 0
        self.tokenizer = None

    def _called(self) -> None:
        self.calling_threads.add(threading.get_ident())
        self.num_calls += 1

    def add_request(self, prompt, params, request_id, cache_salt=None):
        self._called()
        if prompt == "bad":
            raise ValueError("prompt is bad")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self.requests[request_id] = [params, []]
        self.fail_next_step |= list(prompt) == POISON
        return request_id

    def abort_request(self, request_id):
        self._called()
        if self.requests.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def has_unfinished_requests(self):
        self._called()
        return bool(self.requests)

    def step(self, deltas_only: bool = False):
        self._called()
        self.num_steps += 1
        time.sleep(self.step_seconds)
        if self.fail_next_step:
            raise RuntimeError("the device fell over")
        prefilled = min(self.queued_tokens, self.prefill_tokens_per_step)
        self.queued_tokens -= prefilled
        self.scheduler.num_prefill_tokens += prefilled
        outputs = []
        for request_id, (params, generated) in list(self.requests.items()):
            generated.append(len(generated))
            finished = len(generated) >= params.max_tokens
            outputs.append(RequestOutput(request_id, None, [1, 2, 3], [
                _sequence_output(j, len(generated), params, finished, deltas_only) for j in range(params.n)], finished))
            if finished:
                del self.requests[request_id]
        return outputs


def _sequence_output(index: int, num_tokens: int, params, finished: bool, deltas_only: bool) -> CompletionOutput:
    tokens = [1000 * index + i for i in range(num_tokens)]
    letter = string.ascii_lowercase[(23 + index) % 26]  # x, y, z, a, ...
    logprobs = None if params.logprobs is None else [TokenLogprob(t, -i / 10, [(t, -i / 10)][:params.logprobs])
                                                     for i, t in enumerate(tokens)]
    output = CompletionOutput(index, letter * num_tokens, tokens, "length" if finished else None, letter,
                              tokens[-1:], logprobs, None if logprobs is None else logprobs[-1:])
    if deltas_only:
        output.text = output.token_ids = output.logprobs = None
    return output
