"""The LoRA gauge LoRA-aware gateways read (Gateway API Inference Extension model-server protocol).

`loraplex_lora_requests_info` mirrors vLLM's `vllm:lora_requests_info`: one series whose labels
list the adapters of running and waiting requests (comma-separated, bounded) and the max-LoRA
limit; its value is the Unix time of the snapshot. It is built at scrape time from
`engine.stats()`, so an old label set never lingers as a stale series.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

from prometheus_client.core import GaugeMetricFamily

MAX_LISTED_ADAPTERS = 32        # bound on names per label (waiting queues can be long)


def adapter_names(keys: Iterable[str], limit: int = MAX_LISTED_ADAPTERS) -> str:
    """'tone@2', 'legal@1', 'tone@1' -> 'legal,tone' (names as clients send them in `model`)."""
    names = sorted({key.split("@", 1)[0] for key in keys})
    return ",".join(names[:limit])


class LoraRequestsInfo:
    """A prometheus_client custom collector over an EngineStats getter."""

    def __init__(self, stats: Callable[[], Any]):
        self.stats = stats

    def describe(self):
        return [GaugeMetricFamily("loraplex_lora_requests_info", "Running and waiting adapters, max LoRAs",
                                  labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])]

    def collect(self):
        stats = self.stats()
        family = GaugeMetricFamily("loraplex_lora_requests_info",
                                   "Running and waiting adapters (labels) and the max-LoRA limit; value = "
                                   "Unix time of the snapshot", labels=["running_lora_adapters",
                                                                        "waiting_lora_adapters", "max_lora"])
        family.add_metric([adapter_names(stats.running_adapters), adapter_names(stats.waiting_adapters),
                           str(stats.max_loras)], time.time())
        yield family
