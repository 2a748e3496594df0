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


def test_pages_are_handed_out_ascending_and_freed_ones_lowest_first():
    allocator = PageAllocator(16, PAGE, enable_prefix_caching=False)
    first, second = allocator.allocate(5), allocator.allocate(3)
    assert (first, second) == ([0, 1, 2, 3, 4], [5, 6, 7])
    allocator.free(first)  # freed tail first, as a finished sequence's are
    assert allocator.allocate(4) == [0, 1, 2, 3]  # not the reverse of how they came back
    assert allocator.allocate(3) == [4, 8, 9]


def test_recently_freed_prefixes_outlive_older_ones_and_free_pages_that_cache_nothing_go_first():
    allocator = PageAllocator(16, PAGE)
    old, _ = cache_prompt(allocator, list(range(16)))  # 4 pages
    new, _ = cache_prompt(allocator, list(range(100, 116)))
    allocator.free(old)
    allocator.free(new)
    assert allocator.allocate(8) == list(range(8, 16))  # the never-used pages, before any cached one
    # The next page must evict: the older half of the recently freed goes (the older prompt), the newer stays.
    allocator.allocate(1)
    assert allocator.match_prefix(list(range(16)), 4)[0] == []
    assert allocator.match_prefix(list(range(100, 116)), 4)[0] == new


def _check_free_pages(allocator):
    free = allocator.free_page_numbers()
    assert len(free) == len(set(free)) == allocator.num_free_pages
    assert free == [p for p in range(allocator.num_pages) if allocator.ref_counts[p] == 0]


def test_free_page_accounting_holds_through_random_allocations_hits_and_frees():
    rng = np.random.default_rng(0)
    allocator = PageAllocator(40, PAGE)
    vocab = 6  # few distinct tokens: prompts share prefixes often
    held = []  # (pages, hashes) per live sequence
    for _ in range(2000):
        if held and (rng.random() < 0.45 or allocator.num_free_pages < 4):
            pages, _ = held.pop(int(rng.integers(len(held))))
            allocator.free(pages)
        else:
            tokens = rng.integers(0, vocab, int(rng.integers(1, 5)) * PAGE).tolist()
            pages, hashes = allocator.match_prefix(tokens, len(tokens) // PAGE)
            missing = len(tokens) // PAGE - len(pages)
            if missing > allocator.num_free_pages:
                allocator.free(pages)
                continue
            new = allocator.allocate(missing)
            assert new == sorted(new) and not set(new) & set(pages)
            assert all(allocator.ref_counts[p] == 1 for p in new)
            pages = pages + new
            allocator.register_full_pages(pages, hashes, tokens, len(tokens))
            held.append((pages, hashes))
        _check_free_pages(allocator)
        in_use = [p for pages, _ in held for p in pages]
        assert all(allocator.ref_counts[p] == in_use.count(p) for p in set(in_use))
    for pages, _ in held:
        allocator.free(pages)
    _check_free_pages(allocator)
    assert allocator.num_free_pages == allocator.num_pages


def _serve_without_a_model(scheduler, prompts, concurrency, output_len=32):
    """Runs `prompts` through the scheduler as the engine would (every scheduled token computed, one
    output token per decode step). Returns the fractions of consecutive block-table entries, over
    every finished sequence, that are the next page up and the next page down."""
    allocator, pending, running = scheduler.allocator, list(prompts), []
    up = down = pairs = 0
    while pending or running:
        while pending and len(running) < concurrency:
            running.append(Sequence("s", pending.pop(), SamplingParams(), seed=0))
            scheduler.add(running[-1])
        for seq, num_new in scheduler.schedule():
            seq.num_computed_tokens += num_new
            allocator.register_full_pages(seq.block_table, seq.page_hashes, seq.token_ids(), seq.num_computed_tokens)
            if seq.num_computed_tokens == seq.num_tokens:
                seq.output_ids.append(7)
                if len(seq.output_ids) == output_len:
                    table = seq.block_table
                    up += sum(b == a + 1 for a, b in zip(table, table[1:]))
                    down += sum(b == a - 1 for a, b in zip(table, table[1:]))
                    pairs += len(table) - 1
                    scheduler.finish(seq, "length")
                    running.remove(seq)
    return up / pairs, down / pairs


def test_a_sequence_gets_ascending_runs_of_pages_after_the_pool_has_churned():
    """The CPU attention reads ascending runs of pages fastest (allocator.py). Least-recently-freed
    order alone hands a long-running server's sequences pages spread over the pool, and each freed
    sequence's pages back in descending order (4% of neighbours adjacent after this churn)."""
    rng = np.random.default_rng(0)
    allocator = PageAllocator(256, 8)
    scheduler = Scheduler(EngineConfig(page_size=8, max_model_len=512, max_num_seqs=16, max_num_batched_tokens=256),
                          allocator)
    prefix = rng.integers(100, 40000, 40).tolist()

    def prompts(n, shared):
        return [(prefix if shared else []) + rng.integers(100, 40000, int(rng.integers(30, 90))).tolist()
                for _ in range(n)]

    fresh_up, _ = _serve_without_a_model(scheduler, prompts(32, True), 16)
    _serve_without_a_model(scheduler, prompts(64, False), 4)  # churn: the pool cycles through about twice
    up, down = _serve_without_a_model(scheduler, prompts(32, True), 16)
    assert up >= 0.4 and up >= 0.7 * fresh_up, (up, fresh_up)
    assert down <= 0.02
    assert allocator.num_free_pages == allocator.num_pages
    assert allocator.prefix_cache_hits > 0
