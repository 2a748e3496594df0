"""Continuous batching: which sequences run this step, and how many tokens each.

One token-budget loop, no separate prefill and decode phases: running sequences go first (a decode
row costs one token, an unfinished prompt its next chunk), then waiting ones are admitted in
arrival order while the budget, the sequence cap and the free pages allow. A long prompt is split
into chunks across steps (chunked prefill). An admitted prompt first takes the pages of its longest
cached prefix (prefix caching, see allocator.py) and computes only the rest. When a running sequence needs a page and none is free,
the most recently admitted running sequence is preempted: its pages are freed and it goes back to
the front of the queue, to be recomputed later.
"""

import collections
import logging
import time

from jaxinfer.allocator import PageAllocator
from jaxinfer.config import EngineConfig
from jaxinfer.sequence import Sequence, SequenceStatus

logger = logging.getLogger("jaxinfer")


class Scheduler:
    def __init__(self, config: EngineConfig, allocator: PageAllocator):
        self.config = config
        self.allocator = allocator
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # in order of admission
        self.num_preemptions = 0
        self.num_prefill_tokens = 0  # scheduled so far, all but decode rows (jaxinfer/admission.py measures it)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def num_queued_tokens(self) -> int:
        """Prefill tokens a prompt arriving now waits behind: every waiting sequence's (no prefix-cache
        hit counted, but for an n > 1 request's siblings, which compute at most the last page of the
        prompt they share) and the rest of the running prompts."""
        page_size = self.config.page_size
        waiting = sum(seq.num_prefill_tokens_left if seq.wait_for is None else min(seq.num_prefill_tokens_left,
                                                                                    page_size) for seq in self.waiting)
        return waiting + sum(seq.num_prefill_tokens_left for seq in self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """The (sequence, number of new tokens) pairs of the next step.

        A step has at most max_num_seqs logits rows: one per sequence, and one per prompt token whose
        logprob a chunk gives (prompt_logprobs). Such a chunk is cut to the rows left after one for
        every other running sequence."""
        budget = self.config.max_num_batched_tokens
        rows = self.config.max_num_seqs
        scheduled = []
        preempted = False
        running = list(self.running)
        for k, seq in enumerate(running):
            if budget == 0:
                break
            if seq.status != SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if seq.scoring:  # the sequences after it keep a row each
                num_new = seq.fit_score_rows(num_new, rows - 1 - (len(running) - 1 - k))
                if num_new == 0:
                    continue
            while not self._reserve_pages(seq, seq.num_computed_tokens + num_new):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                self.num_prefill_tokens += min(num_new, seq.num_prefill_tokens_left)
                scheduled.append((seq, num_new))
                budget -= num_new
                rows -= 1 + seq.score_rows(num_new)[1]
        while (self.waiting and budget > 0 and rows > 0 and not preempted
               and len(self.running) < self.config.max_num_seqs):
            seq = self.waiting[0]
            if seq.wait_for is not None and not (seq.wait_for.finished or seq.wait_for.prompt_computed):
                break  # its sibling is computing the shared prompt: admit it once those pages are cached
            if not seq.block_table and not seq.scoring:
                self._match_prefix(seq)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if seq.scoring and (num_new := seq.fit_score_rows(num_new, rows - 1)) == 0:
                break
            if not self._reserve_pages(seq, seq.num_computed_tokens + num_new):
                self._release(seq)
                break
            self.waiting.popleft()
            self.allocator.count_lookup(seq.num_tokens, seq.num_computed_tokens)
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            self.num_prefill_tokens += min(num_new, seq.num_prefill_tokens_left)
            scheduled.append((seq, num_new))
            budget -= num_new
            rows -= 1 + seq.score_rows(num_new)[1]
        return scheduled

    def reserve_draft(self, seq: Sequence, num_draft: int) -> int:
        """Pages for up to `num_draft` tokens past a decode row's (speculative decoding), from the
        free pages only (a draft never preempts): how many draft tokens have room."""
        page_size = self.config.page_size
        room = len(seq.block_table) * page_size + self.allocator.num_free_pages * page_size - seq.num_tokens
        num_draft = max(0, min(num_draft, room))
        if num_draft:
            self._reserve_pages(seq, seq.num_tokens + num_draft)
        return num_draft

    def _match_prefix(self, seq: Sequence) -> None:
        # At least the last token is computed, so the step has a row to sample from.
        max_pages = (seq.num_tokens - 1) // self.config.page_size
        seq.block_table, seq.page_hashes = self.allocator.match_prefix(seq.token_ids(), max_pages, seq.cache_salt)
        seq.num_computed_tokens = len(seq.block_table) * self.config.page_size
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = seq.num_computed_tokens

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends a sequence (finished or aborted) and frees its pages."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _release(self, seq: Sequence) -> None:
        self.allocator.free(seq.block_table)
        seq.block_table = []
        seq.page_hashes = []
        seq.num_computed_tokens = 0

    def _reserve_pages(self, seq: Sequence, num_tokens: int) -> bool:
        page_size = self.config.page_size
        missing = -(-num_tokens // page_size) - len(seq.block_table)
        if missing <= 0:
            return True
        if missing > self.allocator.num_free_pages:
            return False
        seq.block_table.extend(self.allocator.allocate(missing))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        logger.debug("preempted %s (%d tokens to recompute)", seq.request_id, seq.num_tokens)
