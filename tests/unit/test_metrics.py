"""Metrics: private registry, names and units, bounded adapter labels, HTTP exposition."""

from __future__ import annotations

import urllib.request
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from loraplex.server.engine.io import EngineStats, Timing
from loraplex.server.metrics import AdapterLabels, Metrics


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def _stats(**overrides) -> EngineStats:
    values = dict(num_running=2, num_waiting=3, num_free_blocks=6, num_total_blocks=8, num_active_adapters=1,
                  num_loaded_slots=2, last_batch_size=2, last_batch_tokens=5, total_preemptions=0)
    values.update(overrides)
    return EngineStats(**values)


def test_request_counters_and_histograms_move():
    metrics = Metrics()
    metrics.request_finished("Generate", "OK", "length", "tone@2", prompt_tokens=7, generated_tokens=4,
                             timing=Timing(queue_s=0.01, first_token_s=0.05, total_s=0.2))
    metrics.request_finished("GenerateStream", "CANCELLED", "none", None)
    metrics.token_delta(0.03, 3)
    metrics.uploaded(1234)
    samples = _samples(metrics.render().decode())
    ok = (("adapter", "tone"), ("api", "grpc"), ("code", "OK"), ("finish_reason", "length"), ("method", "Generate"))
    assert samples[("loraplex_requests_total", ok)] == 1
    cancelled = (("adapter", "base"), ("api", "grpc"), ("code", "CANCELLED"), ("finish_reason", "none"),
                 ("method", "GenerateStream"))
    assert samples[("loraplex_requests_total", cancelled)] == 1
    assert samples[("loraplex_prompt_tokens_total", (("adapter", "tone"), ("api", "grpc")))] == 7
    assert samples[("loraplex_generated_tokens_total", (("adapter", "tone"), ("api", "grpc")))] == 4
    assert samples[("loraplex_time_to_first_token_seconds_count", ())] == 1
    assert samples[("loraplex_request_duration_seconds_sum", ())] == 0.2
    assert samples[("loraplex_request_queue_seconds_count", ())] == 1
    assert samples[("loraplex_inter_token_latency_seconds_count", ())] == 3
    assert samples[("loraplex_adapter_uploaded_bytes_total", ())] == 1234


def test_engine_gauges_are_read_at_scrape_time_and_steps_observed():
    from loraplex.server.engine.engine import StepStats

    metrics = Metrics()
    current = {"stats": _stats()}
    metrics.watch_engine(lambda: current["stats"])
    metrics.on_step(StepStats(batch_size=3, batch_tokens=40, step_seconds=0.02, num_running=3, num_waiting=0,
                              kv_usage=0.25, active_adapters=2, num_preempted=1, num_finished=0))
    samples = _samples(metrics.render().decode())
    assert samples[("loraplex_requests_running", ())] == 2
    assert samples[("loraplex_requests_waiting", ())] == 3
    assert samples[("loraplex_kv_cache_usage_ratio", ())] == 0.25
    assert samples[("loraplex_kv_cache_blocks_used", ())] == 2
    assert samples[("loraplex_batch_size_count", ())] == 1
    assert samples[("loraplex_batch_tokens_sum", ())] == 40
    assert samples[("loraplex_preemptions_total", ())] == 1
    current["stats"] = _stats(num_running=0, num_free_blocks=8)
    samples = _samples(metrics.render().decode())
    assert samples[("loraplex_requests_running", ())] == 0
    assert samples[("loraplex_kv_cache_blocks_used", ())] == 0


def test_prefix_cache_counters_and_gauge():
    from loraplex.server.engine.engine import StepStats

    metrics = Metrics()
    metrics.watch_engine(lambda: _stats(num_cached_blocks=5, prefix_caching=True))
    step = dict(batch_size=3, batch_tokens=40, step_seconds=0.02, num_running=3, num_waiting=0, kv_usage=0.25,
                active_adapters=2, num_preempted=0, num_finished=0)
    metrics.on_step(StepStats(**step, prefix_query_tokens=480, prefix_hit_tokens=448, prefix_evicted_blocks=2))
    metrics.on_step(StepStats(**step, prefix_query_tokens=20, prefix_hit_tokens=0))
    samples = _samples(metrics.render().decode())
    assert samples[("loraplex_prefix_cache_queries_total", ())] == 500
    assert samples[("loraplex_prefix_cache_hits_total", ())] == 448
    assert samples[("loraplex_prefix_cache_evictions_total", ())] == 2
    assert samples[("loraplex_prefix_cache_blocks", ())] == 5


def test_adapter_cache_hooks():
    metrics = Metrics()
    metrics.adapter_cache_hit("host")
    metrics.adapter_cache_miss("host")
    metrics.adapter_loaded("host", 0.5)
    metrics.adapter_evicted("device")
    samples = _samples(metrics.render().decode())
    assert samples[("loraplex_adapter_cache_hits_total", (("tier", "host"),))] == 1
    assert samples[("loraplex_adapter_cache_misses_total", (("tier", "host"),))] == 1
    assert samples[("loraplex_adapter_loads_total", (("tier", "host"),))] == 1
    assert samples[("loraplex_adapter_load_seconds_sum", (("tier", "host"),))] == 0.5
    assert samples[("loraplex_adapter_evictions_total", (("tier", "device"),))] == 1


def test_adapter_labels_stay_bounded_and_follow_traffic():
    demoted = []
    labels = AdapterLabels(2, demoted.append)
    assert labels.label(None) == "base"
    assert [labels.label(k) for k in ("a@1", "b@1", "c@1")] == ["a", "b", "other"]
    assert labels.label("a@2") == "a"                       # versions share the name label
    assert labels.label("c@1") == "c"                       # c (2 requests) overtakes b (1)
    assert demoted == ["b"]
    assert labels.label("b@1") == "other"                   # b (2) only ties the weakest (a=2, c=2)


def test_top_n_swaps_and_old_series_are_removed():
    metrics = Metrics(max_adapter_labels=1)
    metrics.request_finished("Generate", "OK", "eos", "a@1", generated_tokens=1)
    for _ in range(2):
        metrics.request_finished("Generate", "OK", "eos", "b@1", generated_tokens=1)
    names = {dict(key[1]).get("adapter") for key in _samples(metrics.render().decode())
             if key[0] == "loraplex_requests_total"}
    assert names == {"b", "other"}      # b overtook a; a's series were removed; first b went to other


def test_own_registry_and_http_endpoint():
    metrics = Metrics()
    assert metrics.registry is not REGISTRY
    assert not any(name.startswith("loraplex_") for name in REGISTRY._names_to_collectors)
    server = metrics.serve("127.0.0.1", 0)
    try:
        port = server.server_address[1]
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        server.shutdown()
    families = {family.name for family in text_string_to_metric_families(body)}
    assert {"loraplex_requests", "loraplex_time_to_first_token_seconds", "loraplex_batch_size"} <= families
    assert all(name.startswith("loraplex_") for name in families)


def test_private_adapters_share_one_label_and_take_no_slot():
    """Issue 16 item 6: private adapters are never named; they do not compete for the bounded labels."""
    metrics = Metrics(max_adapter_labels=1)
    metrics.request_finished("Generate", "OK", "length", "secret@1", private=True, prompt_tokens=3)
    metrics.request_finished("Generate", "NOT_FOUND", "none", None, unresolved=True)
    metrics.request_finished("Generate", "OK", "length", "public@1", prompt_tokens=2)
    body = metrics.render().decode()
    assert 'adapter="private"' in body and 'adapter="public"' in body and 'adapter="other"' in body
    assert "secret" not in body


def test_lora_requests_info_lists_adapters_for_gateways():
    metrics = Metrics()
    current = {"stats": _stats(running_adapters=("tone@1", "legal@2"), waiting_adapters=("tone@3", "zeta@1"),
                               max_loras=4)}
    metrics.watch_engine(lambda: current["stats"])
    samples = _samples(metrics.render().decode())
    info = [(labels, value) for (name, labels), value in samples.items() if name == "loraplex_lora_requests_info"]
    assert len(info) == 1
    labels, value = info[0]
    assert dict(labels) == {"running_lora_adapters": "legal,tone", "waiting_lora_adapters": "tone,zeta",
                            "max_lora": "4"}
    assert value > 1.7e9                                     # a Unix time
    current["stats"] = _stats(max_loras=4)
    samples = _samples(metrics.render().decode())
    info = [dict(labels) for (name, labels), _ in samples.items() if name == "loraplex_lora_requests_info"]
    assert info == [{"running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": "4"}]   # no stale series
