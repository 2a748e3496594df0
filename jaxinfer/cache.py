"""The paged KV cache: its device arrays and the host-side page allocator."""

import collections
import logging

import jax.numpy as jnp

from jaxinfer.config import ModelConfig

logger = logging.getLogger("jaxinfer")


def allocate_kv_cache(config: ModelConfig, num_pages: int, page_size: int, dtype):
    """K and V caches, each [num_layers, num_kv_heads, num_pages, page_size, head_dim]."""
    shape = (config.num_layers, config.num_kv_heads, num_pages, page_size, config.head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def kv_cache_bytes_per_page(config: ModelConfig, page_size: int, dtype) -> int:
    return 2 * config.num_layers * config.num_kv_heads * page_size * config.head_dim * jnp.dtype(dtype).itemsize


class PageAllocator:
    """Hands out fixed-size pages from a free list; a page goes back when its last user frees it."""

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self.free_pages = collections.deque(range(num_pages))
        self.ref_counts = [0] * num_pages

    @property
    def num_free_pages(self) -> int:
        return len(self.free_pages)

    def allocate(self, count: int) -> list[int]:
        if count > len(self.free_pages):
            raise MemoryError(f"asked for {count} KV pages, {len(self.free_pages)} free")
        pages = [self.free_pages.popleft() for _ in range(count)]
        for page in pages:
            self.ref_counts[page] = 1
        return pages

    def free(self, pages: list[int]) -> None:
        for page in pages:
            self.ref_counts[page] -= 1
            if self.ref_counts[page] == 0:
                self.free_pages.append(page)
