"""Prometheus metrics: one private CollectorRegistry, names prefixed `loraplex_`, base units.

Fed from three places: the service layer (`request_finished`, `token_delta`, `uploaded`),
the engine's per-step listener (`on_step`), and the adapter store's cache hooks
(`adapter_cache_*`). Engine gauges (running, waiting, KV usage, ...) are read from
`engine.stats()` at scrape time, so they are never stale. Per-adapter labels are bounded:
the top-N public adapters by traffic get their own label, the rest share `other`; only
adapters that exist (resolved by the engine) take a label, never an id a caller typed, and
private adapters are never named (they share the label `private`).
"""

from __future__ import annotations

import threading
from collections import Counter as TrafficCounter
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
BASE_LABEL, OTHER_LABEL, PRIVATE_LABEL = "base", "other", "private"


class AdapterLabels:
    """Map adapter names to a bounded set of label values: top-N by traffic, else `other`.

    When an unlabeled adapter's traffic overtakes the least-used labeled one, they swap and
    `on_demote(name)` is called so its series can be removed.
    """

    def __init__(self, max_labels: int, on_demote: Callable[[str], None]):
        self.max_labels = max_labels
        self._on_demote = on_demote
        self._traffic: TrafficCounter[str] = TrafficCounter()
        self._labeled: set[str] = set()
        self._lock = threading.Lock()

    def label(self, adapter_key: str | None, private: bool = False) -> str:
        """`adapter_key` must be a resolved, existing adapter's key (never a caller's string):
        only those compete for the bounded labels. Private adapters all share `private`."""
        if not adapter_key:
            return BASE_LABEL
        if private:
            return PRIVATE_LABEL
        name = adapter_key.split("@", 1)[0]
        demoted = None
        with self._lock:
            self._traffic[name] += 1
            if name not in self._labeled and self.max_labels > 0:
                if len(self._labeled) < self.max_labels:
                    self._labeled.add(name)
                else:
                    weakest = min(self._labeled, key=lambda n: self._traffic[n])
                    if self._traffic[name] > self._traffic[weakest]:
                        self._labeled.discard(weakest)
                        self._labeled.add(name)
                        demoted = weakest
            result = name if name in self._labeled else OTHER_LABEL
        if demoted is not None:
            self._on_demote(demoted)
        return result


class Metrics:
    """All loraplex collectors, registered in their own registry."""

    def __init__(self, max_adapter_labels: int = 20):
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.adapters = AdapterLabels(max_adapter_labels, self._forget_adapter)
        self._series: dict[str, set[tuple[Any, tuple[str, ...]]]] = {}
        self._series_lock = threading.Lock()
        # api: "grpc" (code = gRPC status name) or "http" (code = HTTP status, 499 = client went away)
        self.requests = Counter("loraplex_requests", "Finished generation requests by status code and finish reason",
                                ["api", "method", "code", "finish_reason", "adapter"], registry=reg)
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens of finished requests",
                                     ["api", "adapter"], registry=reg)
        self.generated_tokens = Counter("loraplex_generated_tokens", "Generated tokens of finished requests",
                                        ["api", "adapter"], registry=reg)
        self.time_to_first_token = Histogram("loraplex_time_to_first_token_seconds", "Arrival to first token",
                                             buckets=LATENCY_BUCKETS, registry=reg)
        self.inter_token_latency = Histogram("loraplex_inter_token_latency_seconds", "Time between tokens of a stream",
                                             buckets=TOKEN_LATENCY_BUCKETS, registry=reg)
        self.request_duration = Histogram("loraplex_request_duration_seconds", "Arrival to finish (end to end)",
                                          buckets=LATENCY_BUCKETS, registry=reg)
        self.queue_time = Histogram("loraplex_request_queue_seconds", "Arrival to first scheduled",
                                    buckets=LATENCY_BUCKETS, registry=reg)
        self.batch_size = Histogram("loraplex_batch_size", "Sequences per engine step", buckets=BATCH_BUCKETS,
                                    registry=reg)
        self.batch_tokens = Histogram("loraplex_batch_tokens", "Tokens per engine step", buckets=BATCH_BUCKETS,
                                      registry=reg)
        self.step_duration = Histogram("loraplex_step_duration_seconds", "Engine step wall time",
                                       buckets=LATENCY_BUCKETS, registry=reg)
        self.preemptions = Counter("loraplex_preemptions", "Sequences preempted for KV space", registry=reg)
        # Prefix cache (no labels): tokens looked up at admission, of them found cached; blocks evicted.
        self.prefix_queries = Counter("loraplex_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      registry=reg)
        self.prefix_hits = Counter("loraplex_prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                   registry=reg)
        self.prefix_evictions = Counter("loraplex_prefix_cache_evictions",
                                        "Cached KV blocks evicted for new allocations", registry=reg)
        self.adapter_cache_hits = Counter("loraplex_adapter_cache_hits", "Adapter lookups served from a cache tier",
                                          ["tier"], registry=reg)
        self.adapter_cache_misses = Counter("loraplex_adapter_cache_misses", "Adapter lookups that missed a tier",
                                            ["tier"], registry=reg)
        self.adapter_loads = Counter("loraplex_adapter_loads", "Adapter loads into a tier", ["tier"], registry=reg)
        self.adapter_evictions = Counter("loraplex_adapter_evictions", "Adapters evicted from a tier", ["tier"],
                                         registry=reg)
        self.adapter_load_seconds = Histogram("loraplex_adapter_load_seconds", "Adapter load time into a tier",
                                              ["tier"], buckets=LATENCY_BUCKETS, registry=reg)
        self.uploaded_bytes = Counter("loraplex_adapter_uploaded_bytes", "Bytes of committed adapter uploads",
                                      registry=reg)
        self.constrained_requests = Counter("loraplex_constrained_requests",
                                            "Requests with a structured-output constraint, by kind", ["kind"],
                                            registry=reg)
        self.grammar_compile_seconds = Histogram("loraplex_grammar_compile_seconds",
                                                 "Grammar compile time (cache misses), by constraint kind",
                                                 ["kind"], buckets=LATENCY_BUCKETS, registry=reg)
        self.engine_gauges: dict[str, Gauge] = {}
        self._lora_info: Any = None          # gateway_metrics.LoraRequestsInfo once an engine is watched

    # ---- engine ----------------------------------------------------------------------
    def watch_engine(self, stats: Callable[[], Any], is_private: Callable[[str], bool] | None = None) -> None:
        """Expose gauges read from `stats()` (an EngineStats) at scrape time."""
        gauges = {
            "loraplex_requests_running": ("Requests holding KV blocks", lambda s: s.num_running),
            "loraplex_requests_waiting": ("Requests waiting to be scheduled", lambda s: s.num_waiting),
            "loraplex_kv_cache_usage_ratio": ("Used KV cache blocks / all blocks", lambda s: s.kv_usage),
            "loraplex_kv_cache_blocks_used": ("Used KV cache blocks",
                                              lambda s: s.num_total_blocks - s.num_free_blocks),
            "loraplex_kv_cache_blocks": ("All KV cache blocks", lambda s: s.num_total_blocks),
            "loraplex_active_adapters": ("Adapters in the last batch", lambda s: s.num_active_adapters),
            "loraplex_adapter_slots_loaded": ("Adapters resident in device slots", lambda s: s.num_loaded_slots),
            "loraplex_prefix_cache_blocks": ("KV blocks in the prefix cache (held or reclaimable)",
                                             lambda s: s.num_cached_blocks),
        }
        for name, (doc, read) in gauges.items():
            gauge = self.engine_gauges.get(name) or Gauge(name, doc, registry=self.registry)
            gauge.set_function(lambda read=read: float(read(stats())))
            self.engine_gauges[name] = gauge
        from .gateway_metrics import LoraRequestsInfo

        if self._lora_info is None:
            self._lora_info = LoraRequestsInfo(stats)
            self.registry.register(self._lora_info)
        self._lora_info.stats = stats
        if is_private is not None:
            self._lora_info.is_private = is_private

    def on_step(self, step: Any) -> None:
        """Engine step listener (runs on the engine thread; prometheus_client is thread-safe)."""
        self.batch_size.observe(step.batch_size)
        self.batch_tokens.observe(step.batch_tokens)
        self.step_duration.observe(step.step_seconds)
        if step.num_preempted:
            self.preemptions.inc(step.num_preempted)
        if step.prefix_query_tokens:
            self.prefix_queries.inc(step.prefix_query_tokens)
            self.prefix_hits.inc(step.prefix_hit_tokens)
        if step.prefix_evicted_blocks:
            self.prefix_evictions.inc(step.prefix_evicted_blocks)

    # ---- service layer ---------------------------------------------------------------
    def request_finished(self, method: str, code: str, finish_reason: str, adapter_key: str | None,
                         prompt_tokens: int = 0, generated_tokens: int = 0, timing: Any = None,
                         private: bool = False, unresolved: bool = False, api: str = "grpc") -> None:
        """`adapter_key`: the resolved key (None for the base model); `unresolved`: an adapter
        was asked for but never resolved (NOT_FOUND, invalid id): counted under `other`."""
        adapter = OTHER_LABEL if unresolved else self.adapters.label(adapter_key, private)
        self._inc(self.requests, (api, method, code, finish_reason, adapter))
        if prompt_tokens:
            self._inc(self.prompt_tokens, (api, adapter), prompt_tokens)
        if generated_tokens:
            self._inc(self.generated_tokens, (api, adapter), generated_tokens)
        if timing is not None:
            self.queue_time.observe(timing.queue_s)
            self.time_to_first_token.observe(timing.first_token_s)
            self.request_duration.observe(timing.total_s)

    def token_delta(self, seconds_since_previous: float, num_tokens: int) -> None:
        for _ in range(num_tokens):
            self.inter_token_latency.observe(seconds_since_previous / num_tokens)

    def uploaded(self, num_bytes: int) -> None:
        self.uploaded_bytes.inc(num_bytes)

    # ---- adapter store hooks ---------------------------------------------------------
    def adapter_cache_hit(self, tier: str) -> None:
        self.adapter_cache_hits.labels(tier).inc()

    def adapter_cache_miss(self, tier: str) -> None:
        self.adapter_cache_misses.labels(tier).inc()

    def adapter_loaded(self, tier: str, seconds: float) -> None:
        self.adapter_loads.labels(tier).inc()
        self.adapter_load_seconds.labels(tier).observe(seconds)

    def adapter_evicted(self, tier: str) -> None:
        self.adapter_evictions.labels(tier).inc()

    # ---- structured output -----------------------------------------------------------
    def constraint_event(self, event: str, kind: str, seconds: float) -> None:
        """ConstraintCompiler hook: "request" per constrained request, "compiled" per compile."""
        if event == "request":
            self.constrained_requests.labels(kind).inc()
        elif event == "compiled":
            self.grammar_compile_seconds.labels(kind).observe(seconds)

    # ---- exposition ------------------------------------------------------------------
    def render(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, host: str, port: int):
        """Start the /metrics HTTP server on a daemon thread; returns the server (has .shutdown())."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server

    def _inc(self, metric: Counter, labels: tuple[str, ...], amount: float = 1) -> None:
        metric.labels(*labels).inc(amount)
        adapter = labels[-1]
        if adapter not in (BASE_LABEL, OTHER_LABEL, PRIVATE_LABEL):
            with self._series_lock:
                self._series.setdefault(adapter, set()).add((metric, labels))

    def _forget_adapter(self, name: str) -> None:
        with self._series_lock:
            series = self._series.pop(name, set())
        for metric, labels in series:
            try:
                metric.remove(*labels)
            except KeyError:
                pass
