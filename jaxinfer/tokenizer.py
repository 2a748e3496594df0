"""Tokenizers from HF files or GGUF metadata, chat templates, incremental detokenization."""

import functools
import json
import os
from datetime import datetime

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.processors import TemplateProcessing


# Fill-in-the-middle tokens (prefix, suffix, middle), by model family: Qwen2.5-Coder, StarCoder,
# CodeLlama (as its GGUF and HF vocabularies spell them), DeepSeek-Coder
FIM_TOKENS = (("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"), ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
              ("▁<PRE>", "▁<SUF>", "▁<MID>"), ("<PRE>", "<SUF>", "<MID>"),
              ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"))
FIM_STOP_TOKENS = ("<|endoftext|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<EOT>", "▁<EOT>",
                   "<file_sep>", "<｜end▁of▁sentence｜>")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what the checkpoint says about special tokens and chat."""

    def __init__(self, backend: BackendTokenizer, *, chat_template: str | None, bos_token: str | None,
                 eos_token: str | None, eos_token_ids=()):
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        eos_ids = set(eos_token_ids)
        if eos_token is not None and backend.token_to_id(eos_token) is not None:
            eos_ids.add(backend.token_to_id(eos_token))
        self.eos_token_ids = tuple(sorted(eos_ids))
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._template = None

    @classmethod
    def from_gguf(cls, path: str, eos_token_ids=(), fields: dict | None = None) -> "Tokenizer":
        """Builds the tokenizer that the GGUF metadata describes (vocab, merges, special tokens).
        `fields`: the file's metadata as `jaxinfer.weights.gguf.read_gguf` decodes it, where the caller
        has it (else the file is read, or its kept parse taken)."""
        # transformers knows how each of llama.cpp's tokenizer types maps onto a `tokenizers` pipeline.
        # Without torch it says so at import; we need only its tokenizer converters.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

        arch, tokenizer_dict, tokenizer_config = _gguf_tokenizer_fields(path, fields)
        backend, _ = convert_gguf_tokenizer(arch, tokenizer_dict)
        backend = _restore_control_tokens(backend, tokenizer_dict)
        _add_special_tokens_as_the_file_says(backend, tokenizer_config)
        # A Gemma chat turn ends with <end_of_turn>, which the GGUF's single EOS id does not name (HF's
        # generation_config lists both, llama.cpp treats both as end of generation).
        # Likewise a Qwen2/Qwen3 instruct model's text ends with <|endoftext|> where its chat turn ends with
        # <|im_end|>, the file's EOS (their generation_config.json lists both, llama.cpp stops at both).
        end = {"gemma": "<end_of_turn>", "qwen": "<|endoftext|>"}.get(arch.rstrip("0123456789"))
        end_id = backend.token_to_id(end) if end else None
        return cls(backend, chat_template=tokenizer_config.get("chat_template"),
                   bos_token=tokenizer_config.get("bos_token"), eos_token=tokenizer_config.get("eos_token"),
                   eos_token_ids=(*eos_token_ids, *([end_id] if end_id is not None else [])))

    @classmethod
    def from_hf_dir(cls, path: str, eos_token_ids=()) -> "Tokenizer":
        tokenizer_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise FileNotFoundError(f"{path}: no tokenizer.json")
        backend = BackendTokenizer.from_file(tokenizer_file)
        config = {}
        config_file = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(config_file):
            with open(config_file) as f:
                config = json.load(f)
        template = config.get("chat_template")
        template_file = os.path.join(path, "chat_template.jinja")  # transformers >= 4.43 writes it apart
        if template is None and os.path.isfile(template_file):
            with open(template_file) as f:
                template = f.read()
        return cls(backend, chat_template=template, bos_token=_token_text(config.get("bos_token")),
                   eos_token=_token_text(config.get("eos_token")), eos_token_ids=eos_token_ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    @functools.cached_property
    def fim_token_ids(self) -> tuple[int, int, int] | None:
        """Fill in the middle: the (prefix, suffix, middle) tokens of a code model trained to fill the
        middle between a prefix and a suffix, found by their spelling, as llama.cpp finds them
        (`<|fim_prefix|>`... of Qwen2.5-Coder; StarCoder's, CodeLlama's and DeepSeek-Coder's); None
        where the vocabulary has none."""
        for spelling in FIM_TOKENS:
            ids = tuple(self.backend.token_to_id(token) for token in spelling)
            if None not in ids:
                return ids
        return None

    @functools.cached_property
    def fim_stop_token_ids(self) -> list[int]:
        """The tokens that end a filled middle beside EOS (llama.cpp's end-of-generation set for infill):
        Qwen2.5-Coder ends one with `<|endoftext|>` where its chat ends with `<|im_end|>`."""
        return sorted({i for token in FIM_STOP_TOKENS if (i := self.backend.token_to_id(token)) is not None}
                      - set(self.eos_token_ids))

    def encode_infill(self, prefix: str | list[int], suffix: str) -> list[int]:
        """The prompt of a filled middle, prefix-suffix-middle: [BOS where the model adds one], the
        prefix token, the prefix (text, or token ids as given), the suffix token, the suffix, the
        middle token. ValueError where the model has no such tokens."""
        if self.fim_token_ids is None:
            raise ValueError("this model has no fill-in-the-middle tokens (<|fim_prefix|>, <|fim_suffix|>, "
                             "<|fim_middle|> or another spelling of them): suffix needs a code model trained "
                             "to fill the middle")
        pre, suf, mid = self.fim_token_ids
        prefix_ids = self.encode(prefix, add_special_tokens=False) if isinstance(prefix, str) else list(prefix)
        return self.encode("") + [pre] + prefix_ids + [suf] + self.encode(suffix, add_special_tokens=False) + [mid]

    def decode(self, token_ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Renders a conversation with the model's own Jinja chat template."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; use generate() with a plain prompt")
        if self._template is None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **_: json.dumps(
                x, indent=indent, ensure_ascii=ensure_ascii)
            env.globals["raise_exception"] = _raise_template_error
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        # The template writes the special tokens itself (BOS included where the model wants one).
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs),
                           add_special_tokens=False)


def _restore_control_tokens(backend: BackendTokenizer, tokenizer_dict: dict) -> BackendTokenizer:
    """The byte-level vocabulary's control tokens spelled outside the byte alphabet, like DeepSeek's
    `<｜begin▁of▁sentence｜>`, made special tokens at their own ids.

    transformers' converter re-spells such a token in bytes and skips it as a llama.cpp mislabel, so a
    chat template's `<｜begin▁of▁sentence｜>` was cut into pieces. llama.cpp matches it whole, as the
    model's own tokenizer does: the vocabulary entry gets its real spelling back and becomes special.
    """
    if tokenizer_dict.get("tokenizer_type") != "gpt2" or not tokenizer_dict.get("token_type"):
        return backend
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = set(bytes_to_unicode().values())
    missing = [(i, token) for i, (token, kind) in enumerate(zip(tokenizer_dict["tokens"], tokenizer_dict["token_type"]))
               if kind == 3 and not set(token) <= alphabet and backend.token_to_id(token) is None]
    if not missing:
        return backend
    spelling = bytes_to_unicode()
    config = json.loads(backend.to_str())
    vocab = config["model"]["vocab"]
    for i, token in missing:
        respelled = "".join(spelling[b] for b in token.encode())
        if vocab.get(respelled) == i:
            del vocab[respelled]
            vocab[token] = i
            config["added_tokens"].append({"id": i, "content": token, "single_word": False, "lstrip": False,
                                           "rstrip": False, "normalized": False, "special": True})
    return BackendTokenizer.from_str(json.dumps(config))


def _add_special_tokens_as_the_file_says(backend: BackendTokenizer, config: dict) -> None:
    """Makes `encode` add BOS (and EOS) where the GGUF's add_bos_token (add_eos_token) asks for it.

    The converted tokenizer adds what its transformers class adds by default: Gemma's nothing, while
    the model needs its <bos> first (transformers' AutoTokenizer applies the flags afterwards, as here).
    Files that ask for neither keep the converter's post-processor.
    """
    bos = [config["bos_token"]] if config.get("add_bos_token") and config.get("bos_token") else []
    eos = [config["eos_token"]] if config.get("add_eos_token") and config.get("eos_token") else []
    if not bos + eos:
        return
    backend.post_processor = TemplateProcessing(
        single=" ".join([*bos, "$A", *eos]), pair=" ".join([*bos, "$A", *eos, *bos, "$B:1", *eos]),
        special_tokens=[(token, backend.token_to_id(token)) for token in dict.fromkeys(bos + eos)])


def _token_text(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _raise_template_error(message):
    raise jinja2.exceptions.TemplateError(message)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never split a UTF-8 character.

    Decodes a small window (a few tokens of context before the unread ones), so tokenizers whose
    pieces depend on their neighbours (a leading space) still decode as they would in full. A delta
    is held back while the window's text ends in U+FFFD: an incomplete multi-byte character.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids=(), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids[-6:])
        self.prefix_offset = max(len(self.ids) - 5, 0)
        self.read_offset = len(self.ids)

    def add(self, token_ids) -> str:
        self.ids.extend(token_ids)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        full = decode(self.ids[self.prefix_offset:], self.skip_special_tokens)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""


def _gguf_tokenizer_fields(path: str, fields: dict | None = None) -> tuple[str, dict, dict]:
    """(architecture, tokenizer fields, tokenizer config) of a GGUF file, in the shape transformers'
    `convert_gguf_tokenizer` takes. Read with the `gguf` package: transformers' own GGUF reader
    imports torch, which the engine does not install."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING

    from jaxinfer.weights.gguf import read_gguf

    fields = read_gguf(path)[0] if fields is None else fields
    # copies of the lists: the fields may be a kept parse that other callers share
    value = lambda key: list(fields[key]) if isinstance(fields[key], list) else fields[key]  # noqa: E731
    grouped = {group: {name: value(f"tokenizer.{key}") for key, name in renames.items() if f"tokenizer.{key}" in fields}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokenizer, config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer.get("tokenizer_type") == "llama":
        # Older files have no flag, and llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise.
        config.setdefault("add_bos_token", True)
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
                      ("pad_token", "padding_token_id")):
        token_id = fields.get(f"tokenizer.ggml.{key}")
        config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
    return value("general.architecture"), tokenizer, config
