"""Sampling parameters and on-device sampling of the next token of every sequence in a step."""

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp


@dataclass(slots=True)
class SamplingParams:
    """What vLLM's `SamplingParams` means by the same names (defaults included)."""

    n: int = 1
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0
    max_tokens: int | None = 16  # None: up to max_model_len
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        checks = [
            ("n", isinstance(self.n, int) and self.n >= 1, "an integer >= 1"),
            ("temperature", _is_number(self.temperature) and self.temperature >= 0, "a number >= 0"),
            ("top_p", _is_number(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= -1, "-1, 0 (off) or a positive integer"),
            ("min_p", _is_number(self.min_p) and 0 <= self.min_p <= 1, "in [0, 1]"),
            ("max_tokens", self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
             "an integer >= 1"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "non-empty strings"),
            ("stop_token_ids", all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             "non-negative token ids"),
            ("seed", self.seed is None or isinstance(self.seed, int), "an integer"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name} must be {expected}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def sample(logits, temperature, top_k, top_p, min_p, seeds, counters):
    """Next token per row.

    logits: [S, vocab] float32; temperature, top_p, min_p: [S] float32 (temperature 0: greedy);
    top_k: [S] int32 (<= 0: off); seeds, counters: [S] int32 — a row's random draw depends only on
    its own (seed, counter), so a seeded request samples the same tokens whatever shares its batch.
    Returns [S] int32.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def with_sampling(_):
        vocab = logits.shape[-1]
        scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
        order = jnp.argsort(-scaled, axis=-1)  # [S, vocab], best first
        ranked = jnp.take_along_axis(scaled, order, axis=-1)
        probs = jax.nn.softmax(ranked, axis=-1)
        rank = jnp.arange(vocab)[None, :]
        keep = (top_k[:, None] <= 0) | (rank < top_k[:, None])
        keep &= (jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]  # the smallest set reaching top_p
        keep &= probs >= min_p[:, None] * probs[:, :1]
        keep = keep.at[:, 0].set(True)
        ranked = jnp.where(keep, ranked, -jnp.inf)
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counters)
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (vocab,)))(keys)
        choice = jnp.argmax(ranked + gumbel, axis=-1)
        sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
        return jnp.where(temperature == 0, greedy, sampled)

    return jax.lax.cond(jnp.all(temperature == 0), lambda _: greedy, with_sampling, None)
