"""Speculative decoding: the configuration, and n-gram drafts (prompt lookup): vLLM's
`speculative_config={"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": n, ...}`.
Draft models (`{"model": "qwen2.5-coder-0.5b-instruct", "num_speculative_tokens": k}`) propose in
`jaxinfer.draft_model`; both are verified the same way, below.

A sequence's next tokens are guessed from its own text: the last n tokens (n from
prompt_lookup_max down to prompt_lookup_min) are looked up earlier in its prompt and output, and
the up to k tokens that followed their most recent earlier occurrence are the draft. Code edits,
summaries and retrieval answers copy runs of their prompt, so drafts hit there; free text rarely
repeats, so no draft is made and the step is an ordinary decode step.

The step verifies a draft in the ragged batch the kernels already run: the sequence's chunk is its
last token and the k draft tokens (positions L-1 .. L-1+k, written to the cache like a prompt
chunk), and the logits at each of those k+1 positions are sampled, each as a logits row of its own
(`ModelRunner.execute`'s `drafts`: the extra rows are zero-token sequences, as padding rows are, so
no kernel changes and no new program shape). The engine accepts the draft's longest prefix equal to
the tokens the model itself samples at those positions, plus the model's token after it: 1 to k+1
tokens per step. The cache keeps what was computed for the accepted tokens; what it holds past them
is overwritten later.

Sampled rows are verified the same way, and that is rejection sampling. A draft here is a function
of the sequence's text (a lookup, or a draft model's greedy tokens): its proposal distribution q is
one token with probability 1. Speculative sampling accepts draft token d with probability
min(1, p(d) / q(d)) = p(d), and on rejection samples from max(p - q, 0) renormalized: p without d.
Sampling x from p and accepting when x == d does exactly that (x == d with probability p(d); x given
x != d is p without d), and x is then the row's token. Each row draws with the key of the output
index it samples (the sequence's seed and that index), so every token is the one decoding one at a
time draws, greedy or sampled, seeded or not: the output does not depend on speculation at all.
A sampled row can gain less: a draft token is accepted with the model's probability of it, not
whenever it is the model's best.

Rows with penalties, a grammar or min_tokens are not drafted (they run as always in the same step):
the draft rows get neither the token history penalties need nor the masks.
"""

import dataclasses
import json

import numpy as np

METHODS = ("ngram", "draft_model")


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 4  # draft tokens per step at most (k)
    prompt_lookup_max: int = 4  # ngram: the longest suffix looked up (n), tried first
    prompt_lookup_min: int = 2  # ngram: the shortest
    model: str | None = None  # draft_model: a name, path or GGUF file with the target's vocabulary
    # draft_model: a draft ends after a token the draft model gives less than this probability
    # (transformers' assistant_confidence_threshold); 0: always num_speculative_tokens. 0.6: measured
    # best of 0 / 0.3 / 0.6 for Qwen2.5-Coder 0.5B -> 1.5B on the CPU (docs/SERVER.md)
    draft_min_probability: float = 0.6

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"speculative_config method must be one of {METHODS}, got {self.method!r}")
        if self.method != "draft_model":  # a draft model's field only
            object.__setattr__(self, "draft_min_probability", 0.0)
        if (self.method == "draft_model") != (self.model is not None):
            raise ValueError('speculative_config: a "model" is the draft of method "draft_model" and of no other '
                             f"(method {self.method!r}, model {self.model!r})")
        if self.model is not None and not (isinstance(self.model, str) and self.model):
            raise ValueError(f"speculative_config model must be a non-empty string, got {self.model!r}")
        if (isinstance(self.draft_min_probability, bool) or not isinstance(self.draft_min_probability, (int, float))
                or not 0 <= self.draft_min_probability < 1):
            raise ValueError(f"speculative_config draft_min_probability must be a number in [0, 1), got "
                             f"{self.draft_min_probability!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"speculative_config {name} must be a positive integer, got {value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative_config prompt_lookup_min ({self.prompt_lookup_min}) is above "
                             f"prompt_lookup_max ({self.prompt_lookup_max})")

    @classmethod
    def parse(cls, value) -> "SpeculativeConfig | None":
        """From a SpeculativeConfig, a dict or its JSON text (vLLM's `--speculative-config`); None: off."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise ValueError(f"speculative_config is not JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {value!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown field(s) {unknown}; known: {sorted(known)}")
        if "method" not in value:  # vLLM infers it from the draft model's
            if "model" not in value:
                raise ValueError('speculative_config needs a "method" ("ngram") or a draft "model"')
            value = {**value, "method": "draft_model"}
        return cls(**value)

    def describe(self) -> str:
        if self.method == "draft_model":
            return f"draft model {self.model}, up to {self.num_speculative_tokens} draft tokens a step"
        return (f"{self.method}, up to {self.num_speculative_tokens} draft tokens from "
                f"{self.prompt_lookup_min}..{self.prompt_lookup_max}-gram lookups")


def propose_ngram(token_ids, max_tokens: int, min_n: int, max_n: int) -> list[int]:
    """Up to `max_tokens` draft tokens: what followed the most recent earlier occurrence of the
    sequence's last n tokens, for the longest n in [min_n, max_n] that occurs; [] if none does."""
    tokens = np.asarray(token_ids, np.int32)
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        # Windows starting at 0 .. length-1-n: each is followed by at least one token.
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
        hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return tokens[start:start + max_tokens].tolist()
    return []
