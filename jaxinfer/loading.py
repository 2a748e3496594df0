"""Reading a checkpoint into memory for an engine: the tokenizer, the weight formats chosen for this
platform and checkpoint (`quant.resolve_quantization`, the checkpoint's own for AWQ/GPTQ/...), the
model with its weights (`jaxinfer.models.load_model`) and the layouts of the native CPU kernels.
Every engine starts here; the replicas of a data-parallel server share one `LoadedModel`.
"""

import contextlib
import logging
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxinfer import tensor_parallel
from jaxinfer.config import EngineConfig
from jaxinfer.models import load_model
from jaxinfer.models.params import head_tensor_name
from jaxinfer.ops import MATMUL_BACKENDS, resolve_backend
from jaxinfer.quant import resolve_lm_head_quantization, resolve_quantization, use_blocked_layout, weight_bytes_by_format
from jaxinfer.tokenizer import Tokenizer
from jaxinfer.generation_config import sampling_defaults
from jaxinfer.weights import open_checkpoint
from jaxinfer.weights.cache import default_cache_dir
from jaxinfer.weights.gguf import GGUFCheckpoint
from jaxinfer.weights.quantized import resolve_requested as resolve_checkpoint_quantization
from kernels_cpu import native

logger = logging.getLogger("jaxinfer")


def resolve_dtype(name: str):
    if name == "auto":
        # CPUs here have no native bf16: XLA would convert to f32 and back around every op.
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


def resolve_kv_cache_dtype(name: str, dtype, quantization: str, platform: str):
    """EngineConfig.kv_cache_dtype: "auto" is float16 for quantized weights on the CPU (float32
    arithmetic, half the cache bytes), else the model's dtype. On a GPU the cache is the model's dtype
    (the Pallas kernels take q and the cache in one dtype)."""
    if name == "auto":
        cpu_quantized = platform == "cpu" and jnp.dtype(dtype) == jnp.float32 and quantization != "none"
        return jnp.dtype(jnp.float16) if cpu_quantized else jnp.dtype(dtype)
    if platform != "cpu" and jnp.dtype(name) != jnp.dtype(dtype):
        raise ValueError(f"kv_cache_dtype {name} differs from the model's dtype {jnp.dtype(dtype).name}: on a "
                         f"{platform} the cache is the model's dtype (kv_cache_dtype auto)")
    return jnp.dtype(name)


@dataclass(slots=True)
class LoadedModel:
    """A checkpoint read into memory, before any engine places it on its devices: what the replicas
    of a data-parallel server share (`jaxinfer.data_parallel`), so the file is read once."""

    model_config: object  # ModelConfig
    tokenizer: Tokenizer
    dtype: object
    quantization: str
    lm_head_quantization: str
    model: object  # the nnx module, in host memory (staged) or on the default device
    native_layouts: bool  # quantized weights laid out for the native CPU kernels
    weight_bytes_by_format: dict
    staged: bool  # read into host memory for the engines to place on their accelerators
    seconds: float  # time it took
    sampling_defaults: dict  # the model's own sampling defaults (`jaxinfer.generation_config`)


def load_weights(model: str, config: EngineConfig) -> LoadedModel:
    """Opens `model`, checks that `config` fits it (context length, tensor-parallel split) before any
    weight is read, then reads the weights in the format `config` asks for."""
    start = time.perf_counter()
    checkpoint = open_checkpoint(model)
    mc = checkpoint.config
    if isinstance(checkpoint, GGUFCheckpoint):
        tokenizer = Tokenizer.from_gguf(checkpoint.path, eos_token_ids=mc.eos_token_ids, fields=checkpoint.fields)
    else:
        tokenizer = Tokenizer.from_hf_dir(checkpoint.path, eos_token_ids=mc.eos_token_ids)
    dtype = resolve_dtype(config.dtype)
    if config.max_model_len > mc.max_position_embeddings:
        raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's context length "
                         f"{mc.max_position_embeddings}")
    platform = jax.devices()[0].platform
    split = config.tensor_parallel_size > 1 or jax.process_count() > 1
    if split:
        tensor_parallel.check_model(mc, config.tensor_parallel_size)
    matmul_backend = resolve_backend(config.matmul_backend, MATMUL_BACKENDS)
    # The CPU runs a GGUF's own blocks where the native grouped kernel (int8 activations) is built.
    cpu_runs_blocks = (platform == "cpu" and matmul_backend == "xla" and config.cpu_integer_matmul
                       and native.has_group_path())
    # The Pallas kernels (a GPU's, or interpreted on a CPU) run GGUF blocks in grouped formats.
    grouped = platform != "cpu" or matmul_backend != "xla"
    stored_quantization = getattr(checkpoint, "quantization", None)  # an AWQ/GPTQ/... HF checkpoint
    if stored_quantization is not None:
        quantization = resolve_checkpoint_quantization(config.quantization, stored_quantization)
        why = f"the checkpoint's own: {stored_quantization.description}"
    else:
        quantization, why = resolve_quantization(config.quantization, platform,
                                                 isinstance(checkpoint, GGUFCheckpoint), cpu_runs_blocks)
    logger.debug("weights: quantization %s (%s)", quantization, why)
    stored_head = (checkpoint.tensor_type(head_tensor_name(mc)) if hasattr(checkpoint, "tensor_type") else None)
    lm_head_quantization = resolve_lm_head_quantization(config.lm_head_quantization, quantization,
                                                        stored_head, native_head=cpu_runs_blocks,
                                                        tied=mc.tie_word_embeddings)
    logger.debug("LM head: %s (stored as %s)", lm_head_quantization, stored_head or "full precision")
    cache_dir = default_cache_dir() if config.weight_cache_dir == "auto" else config.weight_cache_dir
    # Split over accelerators, or copied to several replicas' devices, the whole model is read into
    # host memory first (it may fit no one device), then each device receives its part.
    staged = (split or config.data_parallel_size > 1) and platform != "cpu"
    with jax.default_device(jax.devices("cpu")[0]) if staged else contextlib.nullcontext():
        loaded = load_model(mc, checkpoint, dtype=dtype, attention_backend=config.attention_backend,
                            quantization=quantization, group_size=config.quantization_group_size,
                            quant_backend=config.matmul_backend, cache_dir=cache_dir,
                            lm_head_quantization=lm_head_quantization, kquants=cpu_runs_blocks and not split,
                            grouped=grouped, row_split=config.tensor_parallel_size)
    if cpu_runs_blocks and split and isinstance(checkpoint, GGUFCheckpoint):
        logger.info("tensor parallelism: GGUF K-quant and Q5_0/Q5_1 projections are not kept as stored (their "
                    "byte stacks are not split across devices): Q4_K as int4 in groups of 32, the rest requantized to int8")
    native_layouts = platform == "cpu" and matmul_backend == "xla" and native.available()
    if native_layouts:
        layouts = use_blocked_layout(loaded, integer=config.cpu_integer_matmul)
        if layouts:
            logger.debug("native CPU matmuls: weights by layout %s (vnni, codes: int8 activations and integer "
                         "dot products; codes: the file's blocks)", layouts)
    return LoadedModel(mc, tokenizer, dtype, quantization, lm_head_quantization, loaded, native_layouts,
                       weight_bytes_by_format(loaded), staged, time.perf_counter() - start,
                       sampling_defaults(checkpoint, config.generation_config))
