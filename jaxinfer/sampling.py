"""Sampling parameters and on-device sampling of the next token of every sequence in a step."""

import math
import reprlib
from dataclasses import dataclass, field
from typing import NamedTuple

import jax
import jax.numpy as jnp


MAX_LOGPROBS = 20  # OpenAI's limit on top_logprobs
MAX_STOP = 16  # stop strings per request
MAX_STOP_LENGTH = 256  # characters of one stop string: a stream holds back up to this many - 1
MAX_STOP_TOKEN_IDS = 256  # stop_token_ids per request
MAX_LOGIT_BIAS = 300  # logit_bias entries per request (OpenAI's limit); the step's arrays are this wide
MAX_BIAS = 100.0  # a logit_bias value lies in [-MAX_BIAS, MAX_BIAS] (OpenAI's range)
MIN_LOGPROB = -9999.0  # a token the grammar forbids (logprob -inf), as vLLM reports it


@dataclass(slots=True)
class TokenLogprob:
    """One generated token's log-probability under the model, and the most likely alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token_id, logprob), best first, as many as SamplingParams.logprobs
    rank: int | None = None  # a prompt token's: 1 + the tokens more likely than it (prompt_logprobs)


@dataclass(slots=True)
class StructuredOutputsParams:
    """vLLM's `StructuredOutputsParams`: exactly one constraint on the generated text. `json`: a JSON
    schema (a dict or its JSON text); `regex`: the whole text matches it; `choice`: the text is one
    of these strings; `grammar`: a Lark or GBNF grammar (llguidance's dialects); `json_object`: any
    JSON object. jaxinfer/structured_outputs.py compiles it."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self):
        if isinstance(self.choice, tuple):
            self.choice = list(self.choice)
        checks = {
            "json": (isinstance(self.json, (dict, str)), "a JSON schema (a dict or its JSON text)"),
            "regex": (isinstance(self.regex, str), "a string"),
            "choice": (isinstance(self.choice, list) and bool(self.choice)
                       and all(isinstance(c, str) for c in self.choice), "a non-empty list of strings"),
            "grammar": (isinstance(self.grammar, str) and bool(self.grammar), "a non-empty string"),
            "json_object": (isinstance(self.json_object, bool), "a boolean"),
        }
        for name, (ok, expected) in checks.items():
            if getattr(self, name) is not None and not ok:
                raise ValueError(f"StructuredOutputsParams.{name} must be {expected}, got "
                                 f"{reprlib.repr(getattr(self, name))}")
        given = [name for name in checks if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"StructuredOutputsParams takes exactly one of json, regex, choice, grammar or "
                             f"json_object, got {given or 'none'}")

    @property
    def kind(self) -> str:
        """The field that holds the constraint."""
        return next(name for name in ("json", "regex", "choice", "grammar", "json_object")
                    if getattr(self, name) not in (None, False))


@dataclass(slots=True)
class SamplingParams:
    """What vLLM's `SamplingParams` means by the same names (defaults included)."""

    n: int = 1
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # over what top_k and min_p keep, renormalized (vLLM's and HF's order)
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0
    presence_penalty: float = 0.0  # subtracted from the logit of every token already generated
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated
    repetition_penalty: float = 1.0  # HF/CTRL style, over prompt and output tokens: > 1 discourages repeats
    logprobs: int | None = None  # return the chosen token's logprob and this many top alternatives (<= 20)
    # vLLM's: each prompt token's logprob (but the first's), its rank and this many top alternatives (<= 20)
    prompt_logprobs: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    # vLLM's: no EOS, stop token or stop string ends the output before this many tokens (a grammar still does)
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None  # a constraint on the text (grammar-masked)
    # OpenAI's: token id -> a bias in [-100, 100] added to its logit before penalties, temperature and
    # the top-k/top-p/min-p filters (vLLM's order); the logprobs stay the model's own
    logit_bias: dict[int, float] | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if isinstance(self.stop_token_ids, (tuple, set, frozenset)):
            self.stop_token_ids = list(self.stop_token_ids)
        checks = [
            ("n", isinstance(self.n, int) and self.n >= 1, "an integer >= 1"),
            ("temperature", _is_number(self.temperature) and self.temperature >= 0, "a number >= 0"),
            ("top_p", _is_number(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= -1, "-1, 0 (off) or a positive integer"),
            ("min_p", _is_number(self.min_p) and 0 <= self.min_p <= 1, "in [0, 1]"),
            ("max_tokens", self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
             "an integer >= 1"),
            ("min_tokens", isinstance(self.min_tokens, int) and not isinstance(self.min_tokens, bool)
             and 0 <= self.min_tokens <= (self.max_tokens or self.min_tokens),
             "an integer >= 0 and at most max_tokens"),
            ("stop", len(self.stop) <= MAX_STOP and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_LENGTH
                                                        for s in self.stop),
             f"at most {MAX_STOP} non-empty strings of at most {MAX_STOP_LENGTH} characters"),
            ("stop_token_ids", isinstance(self.stop_token_ids, list) and len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS
             and all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             f"a list of at most {MAX_STOP_TOKEN_IDS} non-negative token ids"),
            ("presence_penalty", _is_number(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             "in [-2, 2]"),
            ("frequency_penalty", _is_number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             "in [-2, 2]"),
            ("repetition_penalty", _is_number(self.repetition_penalty) and self.repetition_penalty > 0, "> 0"),
            ("logprobs", self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS),
             f"an integer in [0, {MAX_LOGPROBS}]"),
            ("prompt_logprobs", self.prompt_logprobs is None or (
                isinstance(self.prompt_logprobs, int) and not isinstance(self.prompt_logprobs, bool)
                and 0 <= self.prompt_logprobs <= MAX_LOGPROBS), f"an integer in [0, {MAX_LOGPROBS}]"),
            ("seed", self.seed is None or isinstance(self.seed, int), "an integer"),
            ("logit_bias", self.logit_bias is None or (
                isinstance(self.logit_bias, dict) and len(self.logit_bias) <= MAX_LOGIT_BIAS
                and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 and _is_number(b)
                        and -MAX_BIAS <= b <= MAX_BIAS for t, b in self.logit_bias.items())),
             f"a dict of at most {MAX_LOGIT_BIAS} token ids to biases in [-{MAX_BIAS:g}, {MAX_BIAS:g}]"),
            ("structured_outputs", self.structured_outputs is None
             or isinstance(self.structured_outputs, StructuredOutputsParams), "a StructuredOutputsParams"),
        ]
        for name, ok, expected in checks:
            if not ok:
                # reprlib: a refused value of any size gives an error message of a few dozen characters
                raise ValueError(f"SamplingParams.{name} must be {expected}, got {reprlib.repr(getattr(self, name))}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_number(x) -> bool:
    """An int or float that float32, the device's type for these parameters, holds as a finite number."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and abs(x) <= FLOAT32_MAX


FLOAT32_MAX = 3.4028234663852886e38


class SamplingArrays(NamedTuple):
    """Per-row sampling parameters of a step, each [S]."""

    temperature: jax.Array  # float32; 0: greedy
    top_k: jax.Array  # int32; <= 0: off
    top_p: jax.Array  # float32
    min_p: jax.Array  # float32
    presence_penalty: jax.Array  # float32
    frequency_penalty: jax.Array  # float32
    repetition_penalty: jax.Array  # float32; 1: off
    seeds: jax.Array  # int32
    counters: jax.Array  # int32: tokens generated so far, so each draw of a sequence has its own key
    # int32: top alternatives each row wants (SamplingParams.logprobs), -1: no logprobs at all;
    # None: compute them for every row
    num_top_logprobs: jax.Array | None = None
    # [S, MAX_LOGIT_BIAS] int32 token ids (-1: none) and float32 biases of each row's logit_bias;
    # None: no row has one
    logit_bias_ids: jax.Array | None = None
    logit_bias_values: jax.Array | None = None
    # int32: the token whose logprob a row reports (a prompt token: prompt_logprobs), -1: the sampled
    # one; None: every row the sampled one
    scored: jax.Array | None = None


def apply_token_bitmask(logits, token_bitmask):
    """-inf where a row's bitmask forbids the token: logits [S, vocab] float32, token_bitmask
    [S, ceil(vocab / 32)] int32 in llguidance's layout, bit t % 32 of word t // 32 set when token t
    is allowed (an all-ones row allows every token). tests/test_structured_outputs.py checks it
    against numpy's unpacking."""
    num_rows, vocab = logits.shape
    bits = (token_bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # [S, W, 32], low bit first
    allowed = bits.reshape(num_rows, -1)[:, :vocab] != 0  # [S, vocab]
    return jnp.where(allowed, logits, -jnp.inf)


def apply_penalties(logits, p: SamplingArrays, history, num_prompt):
    """Presence/frequency penalties over generated tokens, repetition penalty over prompt and output.

    history: [S, H] int32 token ids of each sequence (prompt then output), -1 padded;
    num_prompt: [S] int32, how many of them are the prompt.
    """
    rows = jnp.arange(logits.shape[0])[:, None]
    valid = history >= 0
    is_output = valid & (jnp.arange(history.shape[1])[None, :] >= num_prompt[:, None])
    ids = jnp.where(valid, history, 0)
    out_counts = jnp.zeros(logits.shape, jnp.float32).at[rows, ids].add(is_output.astype(jnp.float32))
    seen = jnp.zeros(logits.shape, jnp.bool_).at[rows, ids].max(valid)
    rep = p.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - p.frequency_penalty[:, None] * out_counts
    return logits - p.presence_penalty[:, None] * (out_counts > 0)


def apply_logit_bias(logits, ids, values):
    """logits [S, vocab] + each row's biases: ids [S, B] (-1: none, a row's ids distinct), values [S, B]."""
    rows = jnp.arange(logits.shape[0])[:, None]
    valid = ids >= 0
    return logits.at[rows, jnp.where(valid, ids, 0)].add(jnp.where(valid, values, 0.0))


def sample(logits, p: SamplingArrays, history, num_prompt, num_logprobs: int = MAX_LOGPROBS,
           token_bitmask=None):
    """Next token per row, with its logprob and the top `num_logprobs` alternatives.

    logits: [S, vocab] float32. A row's random draw depends only on its own (seed, counter), so a
    seeded request samples the same tokens whatever shares its batch. Logprobs are those of the
    model's distribution (before penalties and temperature), as vLLM reports them, over the tokens
    the row's grammar allows: like vLLM, the bitmask applies to the logits before anything else, so
    constrained logprobs are renormalized over the allowed tokens and a forbidden alternative's is
    -9999 (vLLM's stand-in for -inf, which JSON cannot carry).
    token_bitmask: [S, ceil(vocab / 32)] int32 (`apply_token_bitmask`), all ones on unconstrained rows.
    A row with `p.scored` >= 0 reports that token's logprob (a prompt token's) instead of the sampled
    one's, and its rank (1 + the tokens more likely than it; 0 on other rows).
    Returns tokens [S] int32, logprobs [S], top_ids [S, num_logprobs], top_logprobs [S, num_logprobs],
    ranks [S] int32.
    """
    num_rows = logits.shape[0]
    if token_bitmask is not None:  # no row constrained (the usual step): the unpacking is skipped
        logits = jax.lax.cond(jnp.any(token_bitmask != -1), apply_token_bitmask, lambda x, _: x, logits, token_bitmask)
    use_penalties = jnp.any((p.presence_penalty != 0) | (p.frequency_penalty != 0) | (p.repetition_penalty != 1))
    use_bias = jnp.bool_(False) if p.logit_bias_ids is None else jnp.any(p.logit_bias_ids >= 0)

    def with_sampling(_):
        x = logits
        if p.logit_bias_ids is not None:  # before the penalties, as vLLM's logits processors
            x = jax.lax.cond(use_bias, lambda x: apply_logit_bias(x, p.logit_bias_ids, p.logit_bias_values),
                             lambda x: x, x)
        x = jax.lax.cond(use_penalties, lambda x: apply_penalties(x, p, history, num_prompt), lambda x: x, x)
        greedy = argmax(x)
        scaled = x / jnp.maximum(p.temperature, 1e-6)[:, None]
        weights = filter_logits(scaled, p.top_k, p.top_p, p.min_p)
        # One uniform a row, its inverse CDF over the kept tokens' probabilities.
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(p.seeds, p.counters)
        uniform = jax.vmap(lambda k: jax.random.uniform(k, ()))(keys)
        return jnp.where(p.temperature == 0, greedy, categorical(weights, uniform))

    # All greedy without penalties or biases (the common case of a benchmark or an eval): one argmax.
    plain_greedy = jnp.all(p.temperature == 0) & ~use_penalties & ~use_bias
    tokens = jax.lax.cond(plain_greedy, lambda _: argmax(logits), with_sampling, None)

    reported = tokens if p.scored is None else jnp.where(p.scored >= 0, p.scored, tokens)

    def log_probs(_):  # log p = logit - logsumexp: no [S, vocab] log-softmax array is written
        lse = jax.nn.logsumexp(logits, axis=-1)
        chosen = jnp.take_along_axis(logits, reported[:, None], axis=-1)[:, 0] - lse

        def top(_):
            values, ids = jax.lax.top_k(logits, num_logprobs)
            return ids.astype(jnp.int32), jnp.maximum(values - lse[:, None], MIN_LOGPROB)

        def no_top(_):  # no row wants alternatives: skip the top-k (a sort on XLA's CPU backend)
            return jnp.zeros((num_rows, num_logprobs), jnp.int32), jnp.zeros((num_rows, num_logprobs), jnp.float32)

        if p.num_top_logprobs is None:
            return chosen, *top(None)
        return chosen, *jax.lax.cond(jnp.any(p.num_top_logprobs > 0), top, no_top, None)

    if p.num_top_logprobs is None:
        chosen, top_ids, top_logprobs = log_probs(None)
    else:  # -1: the row wants no logprobs at all
        chosen, top_ids, top_logprobs = jax.lax.cond(
            jnp.any(p.num_top_logprobs >= 0), log_probs,
            lambda _: (jnp.zeros((num_rows,), jnp.float32), jnp.zeros((num_rows, num_logprobs), jnp.int32),
                       jnp.zeros((num_rows, num_logprobs), jnp.float32)), None)
    if p.scored is None:
        return tokens, chosen, top_ids, top_logprobs, jnp.zeros((num_rows,), jnp.int32)

    def rank(_):  # 1 + the tokens strictly more likely than the scored one (vLLM's rank)
        logit = jnp.take_along_axis(logits, reported[:, None], axis=-1)
        return 1 + jnp.sum(logits > logit, axis=-1, dtype=jnp.int32)

    ranks = jax.lax.cond(jnp.any(p.scored >= 0), rank, lambda _: jnp.zeros((num_rows,), jnp.int32), None)
    return tokens, chosen, top_ids, top_logprobs, ranks


CANDIDATES = 64  # the most likely tokens of a row that top_k and top_p look at first


def filter_logits(logits, top_k, top_p, min_p):
    """vLLM's min_p, top_k and top_p, in vLLM's order: min_p on the whole distribution, top_k, then
    top_p on the distribution renormalized over the tokens still kept.

    logits: [S, vocab] float32, temperature applied; top_k [S] int32 (<= 0: off), top_p, min_p [S]
    float32. Ties: top_k keeps every token as likely as the k-th (as vLLM and HF do), and top_p keeps
    or drops equally likely tokens together: a token stays if the tokens strictly more likely than it
    hold less than top_p of the mass (vLLM's sort leaves that to the order of the sort). The most
    likely token always stays.
    Returns [S, vocab] float32: each token's probability where it is kept, 0 where it is dropped (not
    renormalized).

    Nothing is sorted (a sort of [S, vocab] took ~0.2 s a step at 32 rows of a 49k vocabulary on the
    CPU). The k-th largest logit and the smallest probability top_p keeps are thresholds, found by
    bisection over the float32 values' bit patterns: over a row's CANDIDATES most likely tokens
    (`lax.top_k`) when its k is at most that many and they hold top_p of the kept mass (usual), else
    over the whole vocabulary (32 passes of a count or a masked sum, run only in a step with such a
    row). Which of the two a row takes depends on its own logits alone; both apply the same rule.
    """
    num_rows, vocab = logits.shape
    probs = jax.nn.softmax(logits, axis=-1)
    keep = probs >= min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)
    keys = _ordered(logits)
    use_k, use_p = top_k > 0, top_p < 1
    width = min(CANDIDATES, vocab)
    none = jnp.zeros((num_rows,), jnp.int32)
    top_keys, top_ids = jax.lax.cond(
        jnp.any(use_k | use_p), lambda _: (lambda v, i: (_ordered(v), i))(*jax.lax.top_k(logits, width)),
        lambda _: (jnp.zeros((num_rows, width), jnp.int32), jnp.zeros((num_rows, width), jnp.int32)), None)

    # top_k: the k-th largest logit's key; every logit at or above it stays.
    k = jnp.clip(top_k, 1, vocab)
    many = use_k & (k > width)

    def kth_largest(_):  # the largest key with at least k logits at or above it
        lo = jnp.full((num_rows,), jnp.iinfo(jnp.int32).min, jnp.int32)  # count(>= lo) = vocab >= k
        hi = jnp.max(keys, axis=-1) + 1  # count(>= hi) = 0 < k
        return _bisect(lo, hi, lambda mid: jnp.sum(keys >= mid[:, None], axis=-1, dtype=jnp.int32) >= k)

    kth = jnp.where(many, jax.lax.cond(jnp.any(many), kth_largest, lambda _: none, None),
                    jnp.take_along_axis(top_keys, jnp.minimum(k, width)[:, None] - 1, axis=-1)[:, 0])
    keep &= ~use_k[:, None] | (keys >= kth[:, None])
    kept = jnp.where(keep, probs, 0.0)

    # top_p: the smallest probability whose tokens strictly more likely hold less than top_p of the
    # kept mass; every kept probability at or above it stays. The kept tokens are the most likely
    # ones, so the candidates' kept probabilities are the row's largest, in order.
    target = top_p * jnp.sum(kept, axis=-1)
    top_kept = jnp.take_along_axis(kept, top_ids, axis=-1)  # [S, width], non-increasing
    covered = jnp.sum(top_kept, axis=-1) >= target

    def smallest_kept(values, lo):  # mass strictly above lo is >= target; above the largest: 0
        ordered = _ordered(values)  # values >= 0: keys are their bit patterns
        above = lambda mid: jnp.sum(jnp.where(ordered > mid[:, None], values, 0.0), axis=-1)
        return _bisect(lo, jnp.max(ordered, axis=-1), lambda mid: above(mid) >= target) + 1

    wide = use_p & ~covered
    smallest = jnp.where(
        wide, jax.lax.cond(jnp.any(wide), lambda _: smallest_kept(kept, jnp.full((num_rows,), -1, jnp.int32)),
                           lambda _: none, None),
        smallest_kept(top_kept, _ordered(top_kept[:, -1]) - 1))
    keep &= ~use_p[:, None] | (_ordered(kept) >= smallest[:, None])
    keep |= logits == jnp.max(logits, axis=-1, keepdims=True)
    return jnp.where(keep, probs, 0.0)


def _ordered(x):
    """float32 -> int32 keys in the same order (-0.0 below +0.0; NaN not expected)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _bisect(lo, hi, holds):
    """Per row, the largest m in [lo, hi) with holds(m), given holds(lo) and not holds(hi) and holds
    monotone (true, then false). 32 halvings cover any int32 range."""
    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
        ok = holds(mid) & (mid > lo)  # mid == lo once hi = lo + 1: done
        return jnp.where(ok, mid, lo), jnp.where(ok | (mid == lo), hi, mid)

    lo, _ = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    return lo


def categorical(weights, uniform, chunk: int = 128):
    """One token per row drawn with probability weights / their sum (inverse CDF): [S, V] weights >= 0
    with a positive sum, [S] uniforms in [0, 1) -> [S] int32. Never a token of weight 0. Per row, the
    chunk of `chunk` tokens that holds the draw is found from the chunks' running sums, then the token
    inside it: no [S, V] running sum."""
    num_rows, vocab = weights.shape
    pad = -vocab % chunk
    blocks = jnp.pad(weights, ((0, 0), (0, pad))).reshape(num_rows, -1, chunk)
    sums = jnp.sum(blocks, axis=-1)  # [S, C]
    ends = jnp.cumsum(sums, axis=-1)
    target = uniform * ends[:, -1]
    rows = jnp.arange(num_rows)
    last = lambda positive: positive.shape[-1] - 1 - jnp.argmax(positive[:, ::-1], axis=-1)  # last True
    # The first chunk whose running sum passes the target (rounding: at most the last with any weight).
    c = jnp.minimum(jnp.sum(ends <= target[:, None], axis=-1), last(sums > 0))
    start = jnp.where(c > 0, ends[rows, c - 1], 0.0)
    inside = jnp.cumsum(blocks[rows, c], axis=-1)  # [S, chunk]
    j = jnp.minimum(jnp.sum(inside <= (target - start)[:, None], axis=-1), last(blocks[rows, c] > 0))
    return (c * chunk + j).astype(jnp.int32)


def argmax(x, chunk: int = 128):
    """The first index of each row's maximum, [S, V] -> [S] int32: jnp.argmax's answer. XLA's CPU
    backend runs argmax's value-and-index reduce about 30x slower than a max, so: the max of each
    chunk of `chunk` columns, the first chunk holding the row's max, the first max inside it."""
    rows, vocab = x.shape
    if vocab % chunk:
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    chunk_max = jnp.max(x.reshape(rows, vocab // chunk, chunk), axis=-1)  # [S, V / chunk]
    first_chunk = jnp.argmax(chunk_max, axis=-1)  # first chunk with the row's max (NaN: as jnp.argmax)
    block = jnp.take_along_axis(x.reshape(rows, vocab // chunk, chunk), first_chunk[:, None, None], axis=1)[:, 0]
    return (first_chunk * chunk + jnp.argmax(block, axis=-1)).astype(jnp.int32)
