"""ModelConfig (what the checkpoint says) and EngineConfig (how we run it)."""

import dataclasses
import logging
from dataclasses import dataclass

logger = logging.getLogger("jaxinfer")

# Architectures served by models/llama.py, as HF `model_type` and GGUF `general.architecture` spell them.
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
# Everything this engine runs; Gemma 3 (text) by models/gemma3.py (HF spells it "gemma3_text").
ARCHITECTURES = (*LLAMA_FAMILY, "gemma3")
LAYER_TYPES = ("sliding_attention", "full_attention")  # HF's names
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    """The checkpoint describes a model this engine cannot run."""


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # one of ARCHITECTURES
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
    qk_norm: bool = False  # Qwen3: q and k RMS-normalized per head (over head_dim, own weights) before RoPE
    sliding_window: int | None = None  # Mistral v0.1
    # ("linear", factor) or ("llama3", factor, low_freq_factor, high_freq_factor, original_max_position)
    rope_scaling: tuple | None = None
    # GGUF files of Llama 3.1+ carry llama3 rope scaling as precomputed divisors of the frequencies.
    rope_freq_factors: tuple[float, ...] | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""
    # Gemma 3: which layers attend through `sliding_window` and which see everything (LAYER_TYPES, one
    # per layer); empty: every layer uses `sliding_window` (Mistral's, or none).
    layer_types: tuple[str, ...] = ()
    rope_local_theta: float | None = None  # Gemma 3: the RoPE base of the sliding-window layers (unscaled)
    query_pre_attn_scalar: float | None = None  # Gemma: queries are scaled by its -1/2 power (None: head_dim)
    attn_logit_softcap: float | None = None  # Gemma 2: scores become cap * tanh(scores / cap)
    final_logit_softcap: float | None = None  # likewise the logits

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {self.architecture!r}; supported: {', '.join(ARCHITECTURES)}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_heads ({self.num_heads}) is not a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.layer_types and (len(self.layer_types) != self.num_layers or
                                 not set(self.layer_types) <= set(LAYER_TYPES)):
            raise UnsupportedModelError(f"layer_types must give one of {LAYER_TYPES} for each of the "
                                        f"{self.num_layers} layers, got {self.layer_types!r}")

    def layer_windows(self) -> tuple[int, ...]:
        """Each layer's sliding window, 0 for a layer that sees the whole sequence."""
        window = self.sliding_window or 0
        if not self.layer_types:
            return (window,) * self.num_layers
        return tuple(window if kind == "sliding_attention" else 0 for kind in self.layer_types)

    @classmethod
    def from_hf(cls, cfg: dict, name: str = "") -> "ModelConfig":
        """From a Hugging Face `config.json` (transformers 4.x and 5.x spellings)."""
        model_type = cfg.get("model_type", "")
        if model_type not in (*LLAMA_FAMILY, "gemma3_text"):
            raise UnsupportedModelError(f"unsupported model_type {model_type!r} in config.json; supported: "
                                        f"{', '.join(LLAMA_FAMILY)}, gemma3_text")
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        gemma = _gemma3_from_hf(cfg) if model_type == "gemma3_text" else {}
        if gemma:
            rope = gemma.pop("rope")  # the global layers'
        rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        num_heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        sliding, layer_types = cfg.get("sliding_window"), {}
        if model_type in ("qwen2", "qwen3"):
            sliding, layer_types = _qwen_window(cfg)
        return cls(
            architecture="gemma3" if gemma else model_type,
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
            tie_word_embeddings=cfg.get("tie_word_embeddings", bool(gemma)),  # Gemma's default: tied
            attention_bias=model_type == "qwen2" or cfg.get("attention_bias", False),
            qk_norm=model_type == "qwen3",
            sliding_window=sliding,
            rope_scaling=_rope_scaling(rope),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=tuple(eos if isinstance(eos, list) else [eos] if eos is not None else []),
            name=name,
            **layer_types,
            **gemma,
        )

    @classmethod
    def from_gguf(cls, meta: dict, has_output_tensor: bool, rope_freq_factors=None, name: str = "",
                  num_tokens: int = 0) -> "ModelConfig":
        """From GGUF metadata (llama.cpp key names). `num_tokens`: the tokenizer's vocabulary size, for
        files whose architecture has no vocab_size key (Qwen2's, among others)."""
        arch = meta.get("general.architecture", "")
        if arch not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported GGUF architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")

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
            qk_norm=arch == "qwen3",
            # GGUF has no "mistral" architecture: llama.cpp converts Mistral as "llama". Qwen2 and Qwen3
            # apply a window only where their config says use_sliding_window, which GGUF does not carry.
            sliding_window=key("attention.sliding_window") if arch not in ("qwen2", "qwen3") else None,
            rope_scaling=_rope_scaling(rope),
            rope_freq_factors=rope_freq_factors,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=(eos,) if eos is not None else (),
            name=name or meta.get("general.name", ""),
            **(_gemma3_from_gguf(meta) if arch == "gemma3" else {}),
        )


def _qwen_window(cfg: dict) -> tuple[int | None, dict]:
    """(sliding_window, {"layer_types": ...} or {}) of a Qwen2/Qwen3 config.json, as transformers reads
    it: no window unless `use_sliding_window`; then the window (4096 if not given) on the layers from
    `max_window_layers` on (28 if not given), the ones before it attending to everything, unless the
    file lists its `layer_types` itself."""
    if not cfg.get("use_sliding_window", False):
        return None, {}
    window = cfg.get("sliding_window") or 4096
    first = cfg.get("max_window_layers", 28)
    layer_types = cfg.get("layer_types") or [
        "sliding_attention" if i >= first else "full_attention" for i in range(cfg["num_hidden_layers"])]
    return window, {"layer_types": tuple(layer_types)}


def _gemma3_from_hf(cfg: dict) -> dict:
    """Gemma 3's own fields of a config.json, and "rope": the global layers' rope parameters.

    transformers 5 gives `layer_types` and `rope_parameters` per layer type; 4.x gives
    `sliding_window_pattern` (every n-th layer global), `rope_theta` and `rope_scaling` (global
    layers) and `rope_local_base_freq` (sliding layers, never scaled).
    """
    num_layers, pattern = cfg["num_hidden_layers"], cfg.get("sliding_window_pattern", 6)
    layer_types = cfg.get("layer_types") or [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)]
    rope = cfg.get("rope_parameters") or {}
    if "full_attention" in rope:
        global_rope, local_theta = dict(rope["full_attention"]), rope["sliding_attention"]["rope_theta"]
    else:
        global_rope = dict(cfg.get("rope_scaling") or {}, rope_theta=cfg.get("rope_theta", 1_000_000.0))
        local_theta = cfg.get("rope_local_base_freq", 10_000.0)
    if cfg.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise UnsupportedModelError(f"unsupported Gemma 3 activation {cfg['hidden_activation']!r}")
    return dict(rope=global_rope, layer_types=tuple(layer_types), rope_local_theta=float(local_theta),
                query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)),
                attn_logit_softcap=cfg.get("attn_logit_softcapping"),
                final_logit_softcap=cfg.get("final_logit_softcapping"))


def _gemma3_from_gguf(meta: dict) -> dict:
    """What llama.cpp knows of Gemma 3 without reading it from the file (llama-model.cpp, as of
    2025): every 6th layer global when a sliding window is set, base 10000 unscaled for the sliding
    layers, and query_pre_attn_scalar = hidden / heads for the 27B (62 layers), head_dim otherwise."""
    num_layers = meta["gemma3.block_count"]
    heads, hidden = meta["gemma3.attention.head_count"], meta["gemma3.embedding_length"]
    windowed = bool(meta.get("gemma3.attention.sliding_window"))
    layer_types = tuple("full_attention" if not windowed or (i + 1) % 6 == 0 else "sliding_attention"
                        for i in range(num_layers))
    head_dim = meta.get("gemma3.attention.key_length") or hidden // heads
    return dict(layer_types=layer_types, rope_local_theta=10_000.0,
                query_pre_attn_scalar=float(hidden // heads if num_layers == 62 else head_dim))


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
    # The KV cache's dtype (vLLM's --kv-cache-dtype): "auto" is float16 on the CPU when the weights
    # are quantized (llama.cpp's default: half the bytes a decode step reads, read by the native
    # attention, arithmetic in float32), else the model's dtype; "float32"/"float16"/"bfloat16" say
    # it. On a GPU it is the model's dtype.
    kv_cache_dtype: str = "auto"
    page_size: int = 16
    max_model_len: int = 2048
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    # None: kv_cache_memory_fraction of free device memory (default 0.9 on GPU; on CPU 0.5 of available
    # RAM, capped at what max_num_seqs sequences of max_model_len can use)
    num_pages: int | None = None
    kv_cache_memory_fraction: float | None = None
    enable_prefix_caching: bool = True
    # Speculative decoding (`jaxinfer.speculative`): a SpeculativeConfig, or vLLM's dict / JSON text
    # ({"method": "ngram", "num_speculative_tokens": 4, ...}); None: off.
    speculative_config: object = None
    attention_backend: str = "auto"  # jaxinfer.ops.ATTENTION_BACKENDS: the attention and K/V page write kernels
    matmul_backend: str = "auto"  # jaxinfer.ops.MATMUL_BACKENDS: the quantized matmul kernel
    warmup: bool = True  # compile every step shape at start-up
    strict_compile: bool = False  # raise if serving ever needs a program warm-up did not compile
    seed: int = 0
    # Weight format of the projections: jaxinfer.quant.QUANTIZATIONS. "auto" (`quant.resolve_quantization`):
    # a GGUF's own Q8_0/Q4_0/Q4_1 blocks (on GPU; on CPU where the native grouped kernel runs them),
    # else on CPU int8 per channel; a full-precision HF checkpoint on GPU stays so (docs/QUANTIZATION.md).
    # An HF checkpoint with a quantization_config (AWQ, GPTQ, compressed-tensors, FP8) is served in its own
    # format: "auto", "native" or its method's name; anything else is an error naming both.
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
    # Devices the model is split across, by attention heads and MLP columns (`jaxinfer.tensor_parallel`);
    # 1: one device, the step as it always was.
    tensor_parallel_size: int = 1
    # Engine replicas in one server, each on its own tensor_parallel_size devices (`jaxinfer.data_parallel`);
    # 1: one engine, no router.
    data_parallel_size: int = 1
    # Sampling defaults (vLLM's --generation-config): "auto" takes the model's own (generation_config.json,
    # a GGUF's general.sampling.* keys: `jaxinfer.generation_config`) for what a request leaves out;
    # "vllm": SamplingParams' defaults.
    generation_config: str = "auto"

    def __post_init__(self):
        if self.generation_config not in ("auto", "vllm"):
            raise ValueError(f"generation_config must be auto or vllm, got {self.generation_config!r}")
        for field in ("page_size", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size",
                      "data_parallel_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{field} must be a positive integer, got {value!r}")
        if self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}")
        if self.num_pages is not None and (not isinstance(self.num_pages, int) or self.num_pages <= 0):
            raise ValueError(f"num_pages must be a positive integer, got {self.num_pages!r}")
        if self.kv_cache_memory_fraction is not None and not 0 < self.kv_cache_memory_fraction <= 1:
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction!r}")
        from jaxinfer.ops import ATTENTION_BACKENDS, MATMUL_BACKENDS
        from jaxinfer.quant import QUANTIZATIONS
        from jaxinfer.speculative import SpeculativeConfig

        object.__setattr__(self, "speculative_config", SpeculativeConfig.parse(self.speculative_config))

        for field, choices in (("attention_backend", ATTENTION_BACKENDS), ("matmul_backend", MATMUL_BACKENDS)):
            if getattr(self, field) not in choices:
                raise ValueError(f"{field} must be one of {', '.join(choices)}, got {getattr(self, field)!r}")

        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.lm_head_quantization not in ("auto", "none", "int8", "native"):
            raise ValueError(f"lm_head_quantization must be auto, none, int8 or native, got "
                             f"{self.lm_head_quantization!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.kv_cache_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"kv_cache_dtype must be auto, float32, bfloat16 or float16, got {self.kv_cache_dtype!r}")

    def replace(self, **changes) -> "EngineConfig":
        return dataclasses.replace(self, **changes)
