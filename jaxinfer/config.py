"""ModelConfig (what the checkpoint says) and EngineConfig (how we run it)."""

import dataclasses
import logging
from dataclasses import dataclass

logger = logging.getLogger("jaxinfer")

# Architectures served by models/llama.py, as HF `model_type` and GGUF `general.architecture` spell them.
LLAMA_FAMILY = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    """The checkpoint describes a model this engine cannot run."""


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # "llama" | "mistral" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # Qwen2: q/k/v projections carry a bias
    sliding_window: int | None = None  # Mistral v0.1
    # ("linear", factor) or ("llama3", factor, low_freq_factor, high_freq_factor, original_max_position)
    rope_scaling: tuple | None = None
    # GGUF files of Llama 3.1+ carry llama3 rope scaling as precomputed divisors of the frequencies.
    rope_freq_factors: tuple[float, ...] | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""

    def __post_init__(self):
        if self.architecture not in LLAMA_FAMILY:
            raise UnsupportedModelError(
                f"unsupported architecture {self.architecture!r}; supported: {', '.join(LLAMA_FAMILY)}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_heads ({self.num_heads}) is not a multiple of num_kv_heads ({self.num_kv_heads})")

    @classmethod
    def from_hf(cls, cfg: dict, name: str = "") -> "ModelConfig":
        """From a Hugging Face `config.json` (transformers 4.x and 5.x spellings)."""
        model_type = cfg.get("model_type", "")
        if model_type not in LLAMA_FAMILY:
            raise UnsupportedModelError(
                f"unsupported model_type {model_type!r} in config.json; supported: {', '.join(LLAMA_FAMILY)}")
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        num_heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        sliding = cfg.get("sliding_window")
        if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
            sliding = None
        return cls(
            architecture=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=model_type == "qwen2" or cfg.get("attention_bias", False),
            sliding_window=sliding,
            rope_scaling=_rope_scaling(rope),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=tuple(eos if isinstance(eos, list) else [eos] if eos is not None else []),
            name=name,
        )

    @classmethod
    def from_gguf(cls, meta: dict, has_output_tensor: bool, rope_freq_factors=None, name: str = "",
                  num_tokens: int = 0) -> "ModelConfig":
        """From GGUF metadata (llama.cpp key names). `num_tokens`: the tokenizer's vocabulary size, for
        files whose architecture has no vocab_size key (Qwen2's, among others)."""
        arch = meta.get("general.architecture", "")
        if arch not in LLAMA_FAMILY:
            raise UnsupportedModelError(
                f"unsupported GGUF architecture {arch!r}; supported: {', '.join(LLAMA_FAMILY)}")

        def key(k, default=None):
            return meta.get(f"{arch}.{k}", default)

        hidden = key("embedding_length")
        num_heads = key("attention.head_count")
        num_kv = key("attention.head_count_kv") or num_heads
        scaling_type = key("rope.scaling.type")
        rope = {}
        if scaling_type == "linear":
            rope = {"rope_type": "linear", "factor": key("rope.scaling.factor")}
        elif scaling_type not in (None, "none"):
            raise UnsupportedModelError(f"unsupported GGUF rope scaling {scaling_type!r}")
        vocab = key("vocab_size") or num_tokens or len(meta.get("tokenizer.ggml.tokens", []))
        if not vocab:
            raise UnsupportedModelError("the GGUF file gives no vocabulary size (no vocab_size key, no tokens)")
        eos = meta.get("tokenizer.ggml.eos_token_id")
        return cls(
            architecture=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=key("feed_forward_length"),
            num_layers=key("block_count"),
            num_heads=num_heads,
            num_kv_heads=num_kv,
            head_dim=key("attention.key_length") or hidden // num_heads,
            rms_norm_eps=key("attention.layer_norm_rms_epsilon", 1e-6),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            max_position_embeddings=key("context_length", 2048),
            tie_word_embeddings=not has_output_tensor,
            attention_bias=arch == "qwen2",
            # GGUF has no "mistral" architecture: llama.cpp converts Mistral as "llama". Qwen2 applies a
            # window only where its config says use_sliding_window, which GGUF does not carry.
            sliding_window=key("attention.sliding_window") if arch != "qwen2" else None,
            rope_scaling=_rope_scaling(rope),
            rope_freq_factors=rope_freq_factors,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=(eos,) if eos is not None else (),
            name=name or meta.get("general.name", ""),
        )


def _rope_scaling(rope: dict) -> tuple | None:
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(f"unsupported rope scaling type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")
    if rope_type == "linear":
        return ("linear", float(rope["factor"]))
    if rope_type == "llama3":
        return ("llama3", float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
                int(rope["original_max_position_embeddings"]))
    return None


@dataclass(frozen=True)
class EngineConfig:
    """Limits and cache shape of one engine."""

    dtype: str = "auto"  # "auto": float32 on CPU (no native bf16 there), bfloat16 on GPU
    page_size: int = 16
    max_model_len: int = 2048
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    # None: kv_cache_memory_fraction of free device memory (default 0.9 on GPU; on CPU 0.5 of available
    # RAM, capped at what max_num_seqs sequences of max_model_len can use)
    num_pages: int | None = None
    kv_cache_memory_fraction: float | None = None
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"  # jaxinfer.ops.BACKENDS: the attention and K/V page write kernels
    matmul_backend: str = "auto"  # jaxinfer.ops.BACKENDS: the quantized matmul kernel
    warmup: bool = True  # compile every step shape at start-up
    strict_compile: bool = False  # raise if serving ever needs a program warm-up did not compile
    seed: int = 0
    # Weight format of the projections: jaxinfer.quant.QUANTIZATIONS. "auto" (`quant.resolve_quantization`):
    # a GGUF's own Q8_0/Q4_0/Q4_1 blocks (on GPU; on CPU where the native grouped kernel runs them),
    # else on CPU int8 per channel; a full-precision HF checkpoint on GPU stays so (docs/QUANTIZATION.md).
    quantization: str = "auto"
    quantization_group_size: int | None = None  # int4: 32, 64 or 128 rows per scale (default 32)
    # The LM head (and a tied embedding): "auto" (`quant.resolve_lm_head_quantization`), "none", "int8"
    # (per vocabulary entry) or "native" (a GGUF's Q8_0 head as stored).
    lm_head_quantization: str = "auto"
    # CPU: quantize activations to int8 (blocks of 32) and use integer dot products (kernels_cpu, AVX-512
    # VNNI or AVX2), for per-channel int8 and for a GGUF's own blocks; False: float32 activations (int8
    # weights converted in registers; GGUF blocks then requantized to int8 per channel by "auto").
    cpu_integer_matmul: bool = True
    # Converted-weight cache: "auto" is $JAXINFER_CACHE_DIR or ~/.cache/jaxinfer/weights; None: off
    weight_cache_dir: str | None = "auto"

    def __post_init__(self):
        for field in ("page_size", "max_model_len", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{field} must be a positive integer, got {value!r}")
        if self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}")
        if self.num_pages is not None and (not isinstance(self.num_pages, int) or self.num_pages <= 0):
            raise ValueError(f"num_pages must be a positive integer, got {self.num_pages!r}")
        if self.kv_cache_memory_fraction is not None and not 0 < self.kv_cache_memory_fraction <= 1:
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction!r}")
        from jaxinfer.ops import BACKENDS
        from jaxinfer.quant import QUANTIZATIONS

        for field in ("attention_backend", "matmul_backend"):
            if getattr(self, field) not in BACKENDS:
                raise ValueError(f"{field} must be one of {', '.join(BACKENDS)}, got {getattr(self, field)!r}")

        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.lm_head_quantization not in ("auto", "none", "int8", "native"):
            raise ValueError(f"lm_head_quantization must be auto, none, int8 or native, got "
                             f"{self.lm_head_quantization!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")

    def replace(self, **changes) -> "EngineConfig":
        return dataclasses.replace(self, **changes)
