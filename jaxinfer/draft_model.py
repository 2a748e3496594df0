"""Speculative decoding with a draft model, as vLLM's `speculative_config={"model": "...",
"num_speculative_tokens": k}`: a smaller model with the target's vocabulary (Qwen2.5-Coder-0.5B for
the 1.5B) proposes each request's next k tokens (its own greedy ones), one decode step of its own per
token, and the target verifies them in one step exactly as it verifies n-gram drafts
(`jaxinfer.speculative`): the output is the tokens the target itself gives, whatever the draft proposes.

The draft's KV cache has as many pages as the target's and is addressed by the same block tables
(vLLM shares them the same way): a page the scheduler gives a sequence holds the target's K/V in one
cache and the draft's in the other, so prefix caching, preemption and freeing need nothing new. The
draft computes each position of a draftable sequence (no penalties, grammar or min_tokens) that the
target computes, prompt chunks included, in a step of its own just before the target's step;
`Sequence.num_draft_computed` says how far its K/V go. After a step that accepted a whole draft they
are one position short of the target's (the last draft token was never an input of the draft): the
next draft chunk starts there.

An engine step with a draft model: one draft step over the draftable rows (each row's chunk, from
where the draft's K/V end), which gives each drafting decode row its first draft token, then up to
k - 1 one-token draft steps of the drafting rows. All of them are shapes of the runner's buckets,
compiled at warm-up as the target's are.

Known gap: a sequence that finishes one position short leaves that position of its last page
unwritten in the draft's cache; a later request that reuses the page through the prefix cache
drafts from a cache with a stale entry there. That can lower acceptance; it cannot change output.
"""

import math
from dataclasses import dataclass, field

from jaxinfer.loading import LoadedModel
from jaxinfer.runner import ModelRunner
from jaxinfer.sampling import SamplingParams
from jaxinfer.sequence import Sequence

GREEDY = SamplingParams(temperature=0)
CONFIDENT = SamplingParams(temperature=0, logprobs=0)  # with the draft token's logprob: its confidence


def draftable(seq: Sequence) -> bool:
    """Whether a sequence can take drafts: one without penalties, a grammar or min_tokens (whose
    history and masks the draft rows do not get), greedy or sampled (`jaxinfer.speculative` says why
    sampled rows need no more). None of these properties changes while a request runs."""
    p = seq.params
    return (seq.matcher is None and not p.presence_penalty and not p.frequency_penalty
            and p.repetition_penalty == 1 and not p.min_tokens)


@dataclass(slots=True, eq=False)
class _Row:
    """A draft-step row: what `ModelRunner.execute` reads of a Sequence."""

    num_computed_tokens: int  # where this row's chunk starts
    tokens: list[int]  # the chunk's tokens
    block_table: list[int]  # the sequence's: the draft's cache uses the same pages
    params: SamplingParams = field(default_factory=lambda: GREEDY)  # CONFIDENT where a threshold applies
    seed: int = 0
    output_ids: tuple = ()

    def token_ids(self, start: int, stop: int) -> list[int]:
        return self.tokens[start - self.num_computed_tokens:stop - self.num_computed_tokens]


class DraftModel:
    def __init__(self, loaded: LoadedModel, engine_config, num_pages: int, kv_cache_dtype, device=None):
        # A draft stops after a token the draft model gave less than this probability (0: never).
        min_probability = engine_config.speculative_config.draft_min_probability
        self._min_logprob = math.log(min_probability) if min_probability > 0 else -math.inf
        self._params = CONFIDENT if min_probability > 0 else GREEDY
        self.runner = ModelRunner(loaded.model, engine_config, num_pages, kv_cache_dtype, device=device)
        self.max_num_batched_tokens = engine_config.max_num_batched_tokens
        self.num_steps = 0  # draft steps run
        self.num_drafts = 0  # drafts proposed

    def propose(self, scheduled: list[tuple[Sequence, int]], rooms: dict[Sequence, int]) -> dict[Sequence, list[int]]:
        """Runs the draft over the step's draftable rows (`scheduled`: the target's (sequence,
        num_new_tokens) before drafts) and returns {sequence: draft}: `rooms[seq]` tokens for each
        decode row given room (its pages already reserved)."""
        entries = [(seq, seq.num_computed_tokens, seq.num_computed_tokens + num_new)
                   for seq, num_new in scheduled if draftable(seq)]
        if not entries:
            return {}
        # The target's tokens fit the step's budget; positions the draft is short of (a whole draft
        # accepted last step) go in too while budget is left.
        budget = self.max_num_batched_tokens - sum(end - start for _, start, end in entries)
        batch = []
        for seq, start, end in entries:
            done = seq.num_draft_computed
            if done is not None and done < start and start - done <= budget:
                budget -= start - done
                start = done
            batch.append((_Row(start, seq.token_ids(start, end), seq.block_table, self._params), end - start))
            # Short of budget (rare: a step full of prompt chunks), the position stays unwritten
            # in the draft's cache: it can lower acceptance, never change tokens.
            seq.num_draft_computed = end
        out = self._run(batch)
        drafts, going = {}, set()  # going: still drafting (room left, and the last token was confident)
        for i, (seq, _, _) in enumerate(entries):
            if rooms.get(seq):
                drafts[seq] = [int(out.tokens[i])]
                if rooms[seq] > 1 and out.logprobs[i] >= self._min_logprob:
                    going.add(seq)
        for j in range(1, max(rooms.values(), default=0)):
            # Draft token j is the input at position c + j (c: the sequence's last token's).
            active = [seq for seq in drafts if seq in going]
            if not active:
                break
            out = self._run([(_Row(seq.num_computed_tokens + j, [drafts[seq][-1]], seq.block_table, self._params), 1)
                             for seq in active])
            for i, seq in enumerate(active):
                drafts[seq].append(int(out.tokens[i]))
                if rooms[seq] <= j + 1 or out.logprobs[i] < self._min_logprob:
                    going.discard(seq)
        for seq, draft in drafts.items():  # the last draft token was never the draft's input
            seq.num_draft_computed = seq.num_computed_tokens + len(draft)
        self.num_drafts += len(drafts)
        return drafts

    def _run(self, batch):
        self.num_steps += 1
        return self.runner.execute(batch)
