"""The paged KV cache's device arrays and their size: one K and one V array per model,
[num_layers, num_kv_heads, num_pages, page_size, head_dim]. `jaxinfer.allocator` hands the pages out."""

import os

import jax
import jax.numpy as jnp

from jaxinfer.config import ModelConfig


def allocate_kv_cache(config: ModelConfig, num_pages: int, page_size: int, dtype, device=None):
    """K and V caches, each [num_layers, num_kv_heads, num_pages, page_size, head_dim], made on
    `device` (a device or a sharding; None: the default device), never on another on the way."""
    shape = (config.num_layers, config.num_kv_heads, num_pages, page_size, config.head_dim)
    return jnp.zeros(shape, dtype, device=device), jnp.zeros(shape, dtype, device=device)


def kv_cache_bytes_per_page(config: ModelConfig, page_size: int, dtype) -> int:
    return 2 * config.num_layers * config.num_kv_heads * page_size * config.head_dim * jnp.dtype(dtype).itemsize


def free_device_memory(device=None) -> int:
    """Bytes free on `device` (default: this process's first): the allocator's view on a GPU, available
    RAM on a CPU."""
    stats = (device or jax.local_devices()[0]).memory_stats()
    if stats and "bytes_limit" in stats:
        return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
