"""Structured outputs: a request's constraint on its text (JSON schema, regex, choice, grammar) compiled
into a grammar whose matcher says, before each sampled token, which tokens may come next.

The grammar engine is llguidance (guidance-ai/llguidance): a Rust core with a numpy API, the engine
behind vLLM's `guidance` backend and llama.cpp's grammars. Not xgrammar: it depends on torch, which
on Python 3.12 resolves to a 2.7 GB CUDA build here; llguidance is one 3 MB wheel.

Each constrained sequence holds its own `LLMatcher` (n > 1: one per choice). Before a step the engine
asks `token_bitmask` for the packed masks of the rows that sample ([S, ceil(vocab / 32)] int32, all
ones on unconstrained rows); the step program applies them to the logits (`sampling.apply_token_bitmask`);
after the step each matcher consumes its sampled token. A preempted sequence keeps its output tokens
(preemption recomputes them), so its matcher, which has consumed exactly those, stays valid.
"""

import json
from collections import OrderedDict

import llguidance
import llguidance.numpy
import numpy as np

from jaxinfer.sampling import StructuredOutputsParams
from jaxinfer.tokenizer import Tokenizer

# JSON without free whitespace: with llguidance's default (any run of whitespace between tokens) a
# small model can spend its whole max_tokens on newlines inside a valid but unfinished object.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class StructuredOutputsError(ValueError):
    """A constraint that does not compile; `kind` names the StructuredOutputsParams field."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"the {kind} constraint does not compile: {message}")
        self.kind = kind


def grammar_text(params: StructuredOutputsParams) -> str:
    """The llguidance grammar (its JSON form) of a constraint; a ValueError for one llguidance cannot
    even read (a JSON schema that is not JSON, a GBNF grammar that does not convert)."""
    kind = params.kind
    if kind == "json":
        schema = json.loads(params.json) if isinstance(params.json, str) else params.json
        if not isinstance(schema, dict):
            raise ValueError("a JSON schema is an object")
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(params.regex)
    if kind == "choice":
        return llguidance.grammar_from("choice", params.choice)
    return llguidance.grammar_from("grammar", params.grammar)  # Lark, or GBNF converted to Lark


def cache_key(params: StructuredOutputsParams) -> tuple[str, str]:
    """Equal constraints, equal keys: a schema given as a dict or as JSON text with keys in any order."""
    kind = params.kind
    value = getattr(params, kind)
    if kind == "json" and isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return kind, value
    return kind, value if isinstance(value, str) else json.dumps(value, sort_keys=True)


class GrammarCompiler:
    """Compiles constraints for one tokenizer and keeps the last `cache_size` compiled, so the same
    schema twice is compiled once: a new sequence gets a copy of the compiled matcher in its start
    state. The engine's thread alone uses it (LLMEngine.add_request compiles)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, cache_size: int = 256):
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size  # the logits' width, which may exceed the tokenizer's
        self.cache_size = cache_size
        self._ll_tokenizer = None  # built at the first constrained request (about 0.5 s)
        self._compiled: OrderedDict[tuple[str, str], llguidance.LLMatcher] = OrderedDict()
        self._executor = llguidance.LLExecutor()
        self.num_compiled = 0  # grammars compiled (cache misses)

    def matcher(self, params: StructuredOutputsParams) -> llguidance.LLMatcher:
        """A fresh matcher for `params`; StructuredOutputsError if it does not compile."""
        key = cache_key(params)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compile(params)
            self._compiled[key] = compiled
            if len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(key)
        return compiled.deep_copy()

    def _compile(self, params: StructuredOutputsParams) -> llguidance.LLMatcher:
        try:
            grammar = grammar_text(params)
        except Exception as e:  # llguidance's readers raise ValueError, its GBNF converter anything
            raise StructuredOutputsError(params.kind, str(e)) from None
        matcher = llguidance.LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise StructuredOutputsError(params.kind, matcher.get_error())
        self.num_compiled += 1
        return matcher

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the engine's own tokenizer: its `tokenizers` JSON, the logits' width,
        the engine's EOS ids (no transformers object needed)."""
        if self._ll_tokenizer is None:
            eos = list(self._tokenizer.eos_token_ids) or None
            self._ll_tokenizer = llguidance.LLTokenizer(self._tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                                                        eos_token=eos)
        return self._ll_tokenizer

    def token_bitmask(self, rows: list[tuple[llguidance.LLMatcher, int]], num_rows: int) -> np.ndarray:
        """[num_rows, ceil(vocab / 32)] int32: each (matcher, row)'s allowed next tokens in its row, the
        other rows all ones. The matchers compute in parallel on llguidance's threads."""
        bitmask = llguidance.numpy.allocate_token_bitmask(num_rows, self.vocab_size)  # all ones
        llguidance.numpy.fill_next_token_bitmask_par(self._executor, rows, bitmask)
        return bitmask
