"""Prometheus metrics, named as vLLM's with the `jaxinfer:` prefix, in a registry of the app's own.

Latencies and token counts are observed from the engine's loop thread (`ServerMetrics` is the
AsyncLLMEngine's observer). Engine state (queue lengths, KV cache use, preemptions, prefix cache,
compilations, the admission estimate) and the refusals at submission are read from the engine at
scrape time. With a machine price, a gauge gives the cost of a million generated tokens at the
throughput measured over a sliding window.
"""

import collections
import math
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# vLLM's buckets.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0]
E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0]
COST_WINDOW_S = 60.0


class ServerMetrics:
    def __init__(self, async_engine, model_name: str, price_per_hour: float | None = None,
                 window_s: float = COST_WINDOW_S):
        self.registry = CollectorRegistry()
        labels, values = ["model_name"], [model_name]

        def histogram(name, doc, buckets):
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry).labels(*values)

        def counter(name, doc):
            return Counter(name, doc, labels, registry=self.registry).labels(*values)

        self.ttft = histogram("jaxinfer:time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = histogram("jaxinfer:inter_token_latency_seconds", "Time between consecutive tokens.",
                             ITL_BUCKETS)
        self.e2e = histogram("jaxinfer:e2e_request_latency_seconds", "Request latency, arrival to finish.",
                             E2E_BUCKETS)
        self.prompt_tokens = counter("jaxinfer:prompt_tokens", "Prompt tokens prefilled.")
        self.generation_tokens = counter("jaxinfer:generation_tokens", "Tokens generated.")
        self.registry.register(_EngineCollector(self, async_engine, labels, values))
        self.price_per_hour = price_per_hour
        self.window_s = window_s
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._recent = collections.deque()  # (time.monotonic(), generated tokens) within the window

    # -- the AsyncLLMEngine observer (called from its loop thread) -------------------------------

    def first_token(self, ttft: float, num_prompt_tokens: int) -> None:
        self.ttft.observe(ttft)
        self.prompt_tokens.inc(num_prompt_tokens)

    def tokens(self, num_new: int, itl: float | None) -> None:
        self.generation_tokens.inc(num_new)
        if itl is not None:
            for _ in range(num_new):
                self.itl.observe(itl)
        with self._lock:
            self._recent.append((time.monotonic(), num_new))

    def finished(self, e2e: float) -> None:
        self.e2e.observe(e2e)

    # -- scrape ------------------------------------------------------------------------------------

    def tokens_per_hour(self) -> float:
        """Generated tokens per hour over the last `window_s` seconds (or since start, if sooner)."""
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()
            tokens = sum(n for _, n in self._recent)
        span = min(self.window_s, now - self._started)
        return tokens / span * 3600 if span > 0 else 0.0

    def cost_per_million_tokens(self) -> float:
        """Dollars per million generated tokens at the measured rate; NaN while nothing is generated."""
        rate = self.tokens_per_hour()
        return self.price_per_hour * 1e6 / rate if rate > 0 else math.nan

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Engine state, read from the stats snapshot when Prometheus scrapes."""

    def __init__(self, metrics: ServerMetrics, async_engine, labels, values):
        self.metrics, self.async_engine, self.labels, self.values = metrics, async_engine, labels, values

    def describe(self):
        return []  # collected lazily; nothing to check at registration

    def collect(self):
        stats = self.async_engine.stats

        def family(kind, name, doc, value):
            metric = kind(name, doc, labels=self.labels)
            metric.add_metric(self.values, value)
            return metric

        yield family(GaugeMetricFamily, "jaxinfer:num_requests_running", "Sequences in the running batch.",
                     stats.num_running)
        yield family(GaugeMetricFamily, "jaxinfer:num_requests_waiting", "Sequences waiting for a slot.",
                     stats.num_waiting)
        yield family(GaugeMetricFamily, "jaxinfer:kv_cache_usage_perc", "Fraction of KV cache pages in use (1 = full).",
                     stats.kv_cache_usage)
        yield family(CounterMetricFamily, "jaxinfer:num_preemptions", "Sequences preempted for lack of KV pages.",
                     stats.num_preemptions)
        yield family(CounterMetricFamily, "jaxinfer:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                     stats.prefix_cache_queries)
        yield family(CounterMetricFamily, "jaxinfer:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                     stats.prefix_cache_hits)
        yield family(CounterMetricFamily, "jaxinfer:compilations", "Step programs compiled after warm-up.",
                     stats.num_compilations)
        yield family(CounterMetricFamily, "jaxinfer:spec_decode_num_draft_tokens", "Speculative decoding: draft "
                     "tokens verified.", stats.num_draft_tokens)
        yield family(CounterMetricFamily, "jaxinfer:spec_decode_num_accepted_tokens", "Speculative decoding: draft "
                     "tokens accepted (the model chose the same).", stats.num_accepted_draft_tokens)
        yield family(GaugeMetricFamily, "jaxinfer:queue_wait_estimate_seconds", "Expected wait of a request "
                     "submitted now for its prompt to start: prefill tokens queued / measured prefill rate.",
                     stats.queue_wait)
        rejected = CounterMetricFamily("jaxinfer:requests_rejected", "Requests refused at submission (503), by "
                                       "reason: queue_full (--max-waiting), queue_wait (--max-queue-wait).",
                                       labels=[*self.labels, "reason"])
        for reason, count in self.async_engine.num_rejected.items():
            rejected.add_metric([*self.values, reason], count)
        yield rejected
        replicas = getattr(self.async_engine, "replicas", None)  # a DataParallelEngine's
        if replicas is not None:
            yield from self._per_replica(replicas)
        if self.metrics.price_per_hour is not None:
            yield family(GaugeMetricFamily, "jaxinfer:cost_per_million_tokens_dollars",
                         f"Dollars per million generated tokens at the throughput of the last "
                         f"{self.metrics.window_s:.0f} s and the machine's price per hour.",
                         self.metrics.cost_per_million_tokens())

    def _per_replica(self, replicas):
        """Data parallelism: each replica's queue, cache and routing, labelled `replica` (its index)."""
        labels = [*self.labels, "replica"]
        gauges = [("jaxinfer:replica_num_requests_running", "Sequences in the running batch, per replica.",
                   lambda s: s.num_running),
                  ("jaxinfer:replica_num_requests_waiting", "Sequences waiting for a slot, per replica.",
                   lambda s: s.num_waiting),
                  ("jaxinfer:replica_kv_cache_usage_perc", "Fraction of KV cache pages in use, per replica.",
                   lambda s: s.kv_cache_usage)]
        for name, doc, value in gauges:
            family = GaugeMetricFamily(name, doc, labels=labels)
            for i, replica in enumerate(replicas):
                family.add_metric([*self.values, str(i)], value(replica.stats))
            yield family
        hits = CounterMetricFamily("jaxinfer:replica_prefix_cache_hits", "Prompt tokens found in the prefix cache, "
                                   "per replica.", labels=labels)
        for i, replica in enumerate(replicas):
            hits.add_metric([*self.values, str(i)], replica.stats.prefix_cache_hits)
        yield hits
        routed = CounterMetricFamily("jaxinfer:replica_routed_requests", "Requests the data-parallel router sent "
                                     "to each replica, by what decided: prefix (a cached prefix) or load.",
                                     labels=[*labels, "reason"])
        for i, counts in enumerate(self.async_engine.num_routed):
            for reason, count in counts.items():
                routed.add_metric([*self.values, str(i), reason], count)
        yield routed
