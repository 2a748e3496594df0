"""Data parallelism: N engine replicas in one server, and the router in front of them.

Each replica is a whole engine (`LLMEngine`: its own KV cache, page allocator, scheduler and compiled
step) on its own `tensor_parallel_size` local devices, [i * tp, (i + 1) * tp) for replica i, driven
by its own AsyncLLMEngine loop thread. The checkpoint is read once (`loading.load_weights`); every
replica places that one copy on its devices.

`DataParallelEngine` has the AsyncLLMEngine interface the server's routes and `jaxinfer serve` use
(add_request, generate, abort, stats, health, shutdown), so they do not know how many replicas
there are. A request goes, whole (an `n > 1` request's sequences share their prompt's pages), to:
1. the replica whose prefix cache holds the longest prefix of its prompt, walked with the page
   allocator's own digest chain and cache salt (`allocator.prefix_pages`, `PageAllocator.holds`);
   a match counts only if it covers at least MIN_MATCH_FRACTION of the prompt's full pages (a chat
   template's first page is in every replica's cache and says nothing), and only for a replica whose
   load is less than `max_num_seqs` above the least loaded one's (a cache hit saves one prompt's
   prefill; a full batch queued ahead costs more);
2. then the least loaded (sequences running, waiting and submitted: `AsyncLLMEngine.load`);
3. then the lowest index.
A request's prefix is looked up when it arrives: requests that share a prefix and arrive together,
before the first of them has computed it, are spread by load like any others.

With data_parallel_size 1 none of this exists: the server runs one AsyncLLMEngine as before.
"""

import concurrent.futures
import dataclasses
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator

import jax

from jaxinfer.allocator import prefix_pages
from jaxinfer.async_engine import AsyncLLMEngine, EngineStats, NotAcceptingError, generate_outputs
from jaxinfer.config import EngineConfig
from jaxinfer.engine import LLMEngine, RequestOutput
from jaxinfer.loading import load_weights
from jaxinfer.sampling import SamplingParams

logger = logging.getLogger("jaxinfer")

MIN_MATCH_FRACTION = 0.5  # of a prompt's full pages a cached prefix must cover to draw the request


def replica_devices(config: EngineConfig) -> list[list]:
    """The local devices of each replica: tensor_parallel_size consecutive ones per replica."""
    dp, tp = config.data_parallel_size, config.tensor_parallel_size
    devices = jax.local_devices()
    if dp * tp > len(devices):
        raise ValueError(f"data_parallel_size {dp} x tensor_parallel_size {tp} needs {dp * tp} devices, but only "
                         f"{len(devices)} {devices[0].platform} device(s) are visible (on a CPU, "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={dp * tp} makes more)")
    return [devices[i * tp:(i + 1) * tp] for i in range(dp)]


def build_replicas(model: str, config: EngineConfig) -> list[LLMEngine]:
    """One LLMEngine per replica over one read of the checkpoint; the device count is checked first.
    The replicas compile their step programs side by side (each its own, for its devices)."""
    groups = replica_devices(config)
    loaded = load_weights(model, config)
    engines = []
    for i, devices in enumerate(groups):
        logger.info("data-parallel replica %d of %d on %s", i, len(groups),
                    ", ".join(f"{d.platform}:{d.id}" for d in devices))
        engines.append(LLMEngine(model, config.replace(warmup=False), devices=devices, loaded=loaded))
    if config.warmup:
        with concurrent.futures.ThreadPoolExecutor(len(engines)) as pool:
            list(pool.map(lambda engine: engine.runner.warmup(), engines))
    for engine in engines:
        engine.config = config  # what was asked for: warm-up, if asked, ran above
    return engines


class DataParallelEngine:
    """Routes each request to one of several started-together AsyncLLMEngines (module docstring)."""

    def __init__(self, replicas: list[AsyncLLMEngine]):
        self.replicas = replicas
        self.engine = replicas[0].engine  # the tokenizer, model config and limits the routes read
        config = self.engine.config
        self.page_size, self.prefix_caching = config.page_size, config.enable_prefix_caching
        self.balance_slack = config.max_num_seqs
        self.accepting = True
        self.num_routed = [{"prefix": 0, "load": 0} for _ in replicas]  # requests sent to each, by what decided

    # -- what the routes and the server read -------------------------------------------------------

    @property
    def observer(self):
        return self.replicas[0].observer

    @observer.setter
    def observer(self, observer) -> None:  # one metrics object observes every replica's loop thread
        for replica in self.replicas:
            replica.observer = observer

    @property
    def healthy(self) -> bool:
        return all(replica.healthy for replica in self.replicas)

    @property
    def error(self) -> BaseException | None:
        return next((replica.error for replica in self.replicas if replica.error is not None), None)

    @property
    def stats(self) -> EngineStats:
        """All replicas' snapshots added up (the prefill rate too: the replicas prefill side by side)."""
        snapshots = [replica.stats for replica in self.replicas]
        return EngineStats(**{name: sum(getattr(s, name) for s in snapshots) for name in
                              (f.name for f in dataclasses.fields(EngineStats))})

    @property
    def num_rejected(self) -> dict[str, int]:
        return {reason: sum(replica.num_rejected[reason] for replica in self.replicas)
                for reason in self.replicas[0].num_rejected}

    # -- requests ------------------------------------------------------------------------------------

    def route(self, prompt: str | list[int], cache_salt: str | None = None) -> int:
        """The index of the replica a request with this prompt goes to (module docstring)."""
        token_ids = self.engine.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        loads = [replica.load for replica in self.replicas]
        eligible = [i for i, load in enumerate(loads) if load < min(loads) + self.balance_slack]
        matched = self.cached_pages(token_ids, cache_salt, eligible)
        needed = max(1, MIN_MATCH_FRACTION * (len(token_ids) // self.page_size))
        matched = {i: pages if pages >= needed else 0 for i, pages in matched.items()}
        best = min(matched, key=lambda i: (-matched[i], loads[i], i))
        self.num_routed[best]["prefix" if matched[best] else "load"] += 1
        return best

    def cached_pages(self, token_ids: list[int], cache_salt: str | None, replicas: list[int]) -> dict[int, int]:
        """{replica: full pages at the start of `token_ids` its prefix cache holds}, at most the pages
        its scheduler would reuse (all but the last token is computed). Each digest is computed once,
        and the walk stops at the first page no replica holds."""
        matched = dict.fromkeys(replicas, 0)
        if not self.prefix_caching:
            return matched
        holding = list(replicas)
        limit = (len(token_ids) - 1) // self.page_size
        for parent, tokens, digest in itertools.islice(prefix_pages(token_ids, self.page_size, cache_salt), limit):
            holding = [i for i in holding if self.replicas[i].engine.allocator.holds(parent, tokens, digest)]
            if not holding:
                break
            for i in holding:
                matched[i] += 1
        return matched

    async def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                          cache_salt: str | None = None):
        """`AsyncLLMEngine.add_request` on the replica `route` picks (its admission limits are its own)."""
        if not self.accepting:
            raise NotAcceptingError("the server is shutting down")
        replica = self.replicas[self.route(prompt, cache_salt)]
        return await replica.add_request(prompt, params, request_id or uuid.uuid4().hex, cache_salt)

    def generate(self, prompt: str | list[int], params: SamplingParams,
                 request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """The request's outputs as they come; aborts it if the consumer stops early or is cancelled."""
        return generate_outputs(self, prompt, params, request_id)

    def abort(self, request_id: str) -> None:
        """Told to every replica: the one that has the request ends it, the others ignore the id."""
        for replica in self.replicas:
            replica.abort(request_id)

    # -- life ----------------------------------------------------------------------------------------

    def start(self) -> "DataParallelEngine":
        for replica in self.replicas:
            replica.start()
        return self

    def stop_accepting(self) -> None:
        self.accepting = False
        for replica in self.replicas:
            replica.stop_accepting()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Every replica drains at once, for `timeout` seconds in all, then stops."""
        self.stop_accepting()
        deadline = time.monotonic() + timeout
        for replica in self.replicas:
            replica.shutdown(timeout=max(0.0, deadline - time.monotonic()))
