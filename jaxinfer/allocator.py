"""The host-side page allocator of the paged KV cache, with prefix caching.

Prefix caching (vLLM's automatic prefix caching): every full page of a sequence gets a SHA-256 digest
chained from its parent page's digest and its own token ids (the first page's parent is the
request's cache salt, so tenants with different salts never share pages). A hit is also verified
against the (parent digest, token ids) the page was cached under, so even a digest collision cannot
serve another prompt's KV. A new prompt reuses the longest run of cached pages that starts its token
list. A page nobody uses any more keeps its contents and its hash until it is handed out again.

Which free page is handed out next decides two things: which cached prefixes are forgotten, and where
a sequence's pages lie. The CPU attention reads a sequence's pages in block-table order, and reads
ascending runs of adjacent pages faster than descending runs or pages spread over the pool (a decode
step of SmolLM2 at 32 rows of 500 tokens: 66 ms contiguous, 78 descending, 85 random; docs/BENCHMARKS.md).
Plain LRU order spreads them: each freed sequence's pages come back tail first, and after churn the
least recently freed pages are many sequences' pages interleaved. So free pages are kept in two places:

- `recent`: freed pages that hold a cached prefix, least recently freed first. Nothing is handed out
  from here, which keeps the most recently used prefixes (a conversation's last turn, a system
  prompt between bursts) cached.
- the reusable pages: never-used pages, pages that cache nothing, and cached pages no longer recent.
  Handed out lowest page number first, so a sequence gets ascending runs and the pages in use stay
  packed at the bottom of the pool.

When the reusable pages run short, the older half of `recent` (at least what is missing) becomes
reusable: eviction is least recently freed first at the granularity of halves of `recent` (an
approximate LRU), and within what is evicted, page order decides.
"""

import collections
import hashlib
import heapq
import itertools


def root_digest(cache_salt: str | None = None) -> bytes:
    """The parent digest of a sequence's first page: its cache salt's, or none."""
    return hashlib.sha256(b"jaxinfer-prefix-root\0" + (cache_salt or "").encode()).digest()


def page_hash(parent: bytes, token_ids) -> bytes:
    """sha256(parent digest || token ids as little-endian int64): the page's 32-byte digest."""
    return hashlib.sha256(parent + b"".join(int(t).to_bytes(8, "little", signed=True) for t in token_ids)).digest()


def prefix_pages(token_ids, page_size: int, cache_salt: str | None = None):
    """(parent digest, token ids, digest) of each full page of `token_ids`, in order, computed as it
    goes: the chain every prefix-cache lookup walks (also the data-parallel router's)."""
    parent = root_digest(cache_salt)
    for i in range(len(token_ids) // page_size):
        tokens = tuple(token_ids[i * page_size:(i + 1) * page_size])
        digest = page_hash(parent, tokens)
        yield parent, tokens, digest
        parent = digest


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        # Free pages holding a cached prefix, least recently freed first: never handed out from here.
        self.recent: collections.OrderedDict[int, None] = collections.OrderedDict()
        # The reusable free pages: a min-heap of page numbers, with stale entries (pages taken back by
        # a prefix hit, or pushed twice) skipped; `_reusable[page]` says whether a page really is.
        self._heap = list(range(num_pages))
        self._reusable = bytearray(b"\1" * num_pages)
        self._num_reusable = num_pages
        self.ref_counts = [0] * num_pages
        self.page_hashes: list[bytes | None] = [None] * num_pages
        # What each cached page was cached under: (parent digest, its token ids), checked on every hit.
        self.page_keys: list[tuple[bytes, tuple[int, ...]] | None] = [None] * num_pages
        self.cached_pages: dict[bytes, int] = {}  # digest -> page holding that prefix
        self.prefix_cache_queries = 0  # tokens looked up, once per admission of a sequence (count_lookup)
        self.prefix_cache_hits = 0  # of which found in the cache

    @property
    def num_free_pages(self) -> int:
        return self._num_reusable + len(self.recent)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_pages / self.num_pages

    def free_page_numbers(self) -> list[int]:
        """Every free page (reusable or recent), ascending: for checks and tests."""
        return sorted([p for p in range(self.num_pages) if self._reusable[p]] + list(self.recent))

    def allocate(self, count: int) -> list[int]:
        """`count` pages, ascending, with a reference each; what they cached is forgotten."""
        if count > self.num_free_pages:
            raise MemoryError(f"asked for {count} KV pages, {self.num_free_pages} free")
        if count > self._num_reusable:
            for _ in range(max(count - self._num_reusable, len(self.recent) // 2)):
                self._make_reusable(self.recent.popitem(last=False)[0])
        pages = []
        while len(pages) < count:
            page = heapq.heappop(self._heap)
            if not self._reusable[page]:
                continue  # a stale entry
            self._reusable[page] = 0
            self._num_reusable -= 1
            if self.page_hashes[page] is not None:  # evict its cached prefix
                del self.cached_pages[self.page_hashes[page]]
                self.page_hashes[page] = self.page_keys[page] = None
            self.ref_counts[page] = 1
            pages.append(page)
        return pages

    def free(self, pages: list[int]) -> None:
        # Within `recent`, the tail of a sequence is the least likely to be shared: it goes first.
        for page in reversed(pages):
            self.ref_counts[page] -= 1
            if self.ref_counts[page] == 0:
                if self.page_hashes[page] is not None:
                    self.recent[page] = None
                else:
                    self._make_reusable(page)

    def _make_reusable(self, page: int) -> None:
        if not self._reusable[page]:
            self._reusable[page] = 1
            self._num_reusable += 1
            heapq.heappush(self._heap, page)
            if len(self._heap) > 2 * self._num_reusable + 1024:  # drop the stale entries
                self._heap = [p for p in range(self.num_pages) if self._reusable[p]]

    def match_prefix(self, token_ids: list[int], max_pages: int,
                     cache_salt: str | None = None) -> tuple[list[int], list[bytes]]:
        """Takes a reference on the cached pages that start `token_ids` (at most `max_pages`).

        Returns (pages, their digests).
        """
        pages, hashes = [], []
        if not self.enable_prefix_caching:
            return pages, hashes
        for parent, tokens, digest in itertools.islice(prefix_pages(token_ids, self.page_size, cache_salt),
                                                       max_pages):
            if not self.holds(parent, tokens, digest):
                break
            page = self.cached_pages[digest]
            if self.ref_counts[page] == 0:  # free: take it back (a reusable page's heap entry goes stale)
                if page in self.recent:
                    del self.recent[page]
                else:
                    self._reusable[page] = 0
                    self._num_reusable -= 1
            self.ref_counts[page] += 1
            pages.append(page)
            hashes.append(digest)
        return pages, hashes

    def holds(self, parent: bytes, tokens: tuple[int, ...], digest: bytes) -> bool:
        """Whether a page is cached under `digest` and was cached as `tokens` after `parent` (a hit,
        not a digest collision). Takes no reference and changes nothing, so another thread may ask
        while the engine runs (the data-parallel router): the answer can only be a step stale."""
        page = self.cached_pages.get(digest)
        return page is not None and self.page_keys[page] == (parent, tokens)

    def count_lookup(self, num_tokens: int, num_cached_tokens: int) -> None:
        """Counts the prefix lookup of a sequence the scheduler admitted. Not counted in match_prefix:
        a sequence refused for want of pages gives them back and is looked up again the next step."""
        if self.enable_prefix_caching:
            self.prefix_cache_queries += num_tokens
            self.prefix_cache_hits += num_cached_tokens

    def register_full_pages(self, block_table: list[int], hashes: list[bytes], token_ids: list[int],
                            num_computed_tokens: int, cache_salt: str | None = None) -> None:
        """Hashes the newly completed pages of a sequence (extending `hashes` in place) and caches them."""
        if not self.enable_prefix_caching:
            return
        ps = self.page_size
        for i in range(len(hashes), num_computed_tokens // ps):
            parent = hashes[-1] if hashes else root_digest(cache_salt)
            tokens = tuple(token_ids[i * ps:(i + 1) * ps])
            h = page_hash(parent, tokens)
            hashes.append(h)
            page = block_table[i]
            if h not in self.cached_pages and self.page_hashes[page] is None:
                self.cached_pages[h] = page
                self.page_hashes[page] = h
                self.page_keys[page] = (parent, tokens)
