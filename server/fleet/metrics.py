"""Fleet figures each replica exports beside its `loraplex_*` engine metrics.

Per replica (sum them across replicas in PromQL for the fleet):
- `loraplex_fleet_requests_total{adapter_held}`: generation requests that named an adapter,
  split by whether this replica already held it when the request arrived ("true") or had to
  load it ("false"). Fleet affinity = held / all.
- `loraplex_fleet_adapter_loads_total`: adapters brought into this replica by Ray's
  multiplexed loader (host cache + a free device slot). Fleet loads per request = loads / requests.
- `loraplex_fleet_replica_info{replica}`: 1, naming the replica (the `loraplex-replica` trailer).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class FleetMetrics:
    def __init__(self, registry: CollectorRegistry, replica: str):
        self.requests = Counter("loraplex_fleet_requests", "Generation requests with an adapter, by whether this "
                                "replica already held it", ["adapter_held"], registry=registry)
        self.adapter_loads = Counter("loraplex_fleet_adapter_loads", "Adapters loaded by Ray's multiplexed loader "
                                     "on this replica", registry=registry)
        self.info = Gauge("loraplex_fleet_replica_info", "This replica's name", ["replica"], registry=registry)
        self.info.labels(replica).set(1)
        for held in ("true", "false"):
            self.requests.labels(held)

    def request(self, held: bool) -> None:
        self.requests.labels("true" if held else "false").inc()

    def adapter_loaded(self) -> None:
        self.adapter_loads.inc()
