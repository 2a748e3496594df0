"""The page allocator's prefix cache: chained SHA-256 digests, hits verified against the tokens,
and cache salts that keep tenants apart."""

import hashlib

import numpy as np

from jaxinfer import SamplingParams
from jaxinfer import allocator as page_allocator
from jaxinfer.allocator import PageAllocator
from jaxinfer.config import EngineConfig
from jaxinfer.scheduler import Scheduler
from jaxinfer.sequence import Sequence

PAGE = 4


def cache_prompt(allocator, tokens, cache_salt=None):
    """Admits `tokens` as one sequence whose pages are all computed; returns its pages."""
    pages = allocator.allocate(len(tokens) // PAGE)
    hashes = []
    allocator.register_full_pages(pages, hashes, tokens, len(tokens), cache_salt)
    return pages, hashes


def test_digest_is_sha256_of_the_parent_digest_and_the_token_ids():
    root = page_allocator.root_digest()
    tokens = [1, 2, 3, 70000]
    expected = hashlib.sha256(root + np.asarray(tokens, "<i8").tobytes()).digest()
    assert page_allocator.page_hash(root, tokens) == expected
    second = page_allocator.page_hash(expected, [5, 6, 7, 8])
    assert second == hashlib.sha256(expected + np.asarray([5, 6, 7, 8], "<i8").tobytes()).digest()


def test_a_cached_prefix_hits_page_by_page_and_stops_at_the_first_difference():
    allocator = PageAllocator(16, PAGE)
    pages, hashes = cache_prompt(allocator, list(range(12)))
    hit, hit_hashes = allocator.match_prefix(list(range(8)) + [99, 9, 10, 11], 3)
    assert hit == pages[:2] and hit_hashes == hashes[:2]


def test_two_token_blocks_forced_onto_one_digest_do_not_share_a_page(monkeypatch):
    """A digest collision (forced here: every page gets the same digest) is a miss, not another
    prompt's KV: hits are checked against the tokens the page was cached under."""
    monkeypatch.setattr(page_allocator, "page_hash", lambda parent, tokens: b"\0" * 32)
    allocator = PageAllocator(16, PAGE)
    pages, _ = cache_prompt(allocator, [1, 2, 3, 4])
    assert allocator.match_prefix([5, 6, 7, 8], 1) == ([], [])
    assert allocator.match_prefix([1, 2, 3, 4], 1)[0] == pages


def test_a_cache_salt_keeps_tenants_apart():
    allocator = PageAllocator(16, PAGE)
    tokens = list(range(8))
    pages, _ = cache_prompt(allocator, tokens, cache_salt="tenant-a")
    assert allocator.match_prefix(tokens, 2, cache_salt="tenant-b") == ([], [])
    assert allocator.match_prefix(tokens, 2)[0] == []  # no salt is a salt of its own
    assert allocator.match_prefix(tokens, 2, cache_salt="tenant-a")[0] == pages


def test_a_hit_is_counted_once_per_admission_however_many_steps_the_request_waits_for_pages():
    allocator = PageAllocator(6, PAGE)
    scheduler = Scheduler(EngineConfig(page_size=PAGE, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=64),
                          allocator)
    prefix_pages, _ = cache_prompt(allocator, list(range(8)))
    allocator.free(prefix_pages)  # cached, nobody's: free but still holding the prefix
    held = allocator.allocate(3)  # leaves one page beside the two cached ones
    prompt = list(range(8)) + [50, 51, 52, 53, 54, 55]  # 14 tokens: the cached 2 pages + 2 more needed
    scheduler.add(Sequence("waiting", prompt, SamplingParams(), seed=0))
    for _ in range(3):
        assert scheduler.schedule() == []  # matched the prefix, found one free page of two, gave them back
    allocator.free(held)
    [(seq, num_new)] = scheduler.schedule()
    assert (seq.num_computed_tokens, num_new) == (8, 6)
    assert (allocator.prefix_cache_queries, allocator.prefix_cache_hits) == (14, 8)
