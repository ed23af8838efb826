"""What a replica tells the fleet's router about the adapters in its host memory (issue 35).

Ray Serve already knows which adapters a replica holds in a device slot (its multiplexed model
ids, from `warm_adapter`). The router (routing.py) also wants the next tier: adapters in the
replica's host memory, a slot copy away instead of a fetch from the store. The store's host
cache knows its keys (`host_resident()`, the `loraplex_adapter_resident{tier="host"}` gauge's
source), but the router sees routing ids (wire.routing_id: tenant-scoped digests, never adapter
names). `HostIndex` maps one to the other for the adapters this replica resolved for requests,
and `ReplicaBase.record_routing_stats` reports `{"host": [routing ids]}` to Ray every
ROUTING_STATS_PERIOD_S. Both are bounded (issue 37 item 3): the index keeps the most recently
routed ROUTED_LIMIT ids, the report at most REPORT_LIMIT.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Container, Iterable

HOST_STAT = "host"               # the routing-stats key: routing ids resident in host memory
ROUTING_STATS_PERIOD_S = 1.0     # how often Ray asks each replica (a dict of <= REPORT_LIMIT short strings)
ROUTING_STATS_TIMEOUT_S = 10.0
ROUTED_LIMIT = 1024              # routing ids remembered per replica (LRU)
REPORT_LIMIT = 256               # routing ids reported per replica (most recently routed first)


class HostIndex:
    """Routing id -> store key of the adapters this replica loaded for requests (LRU, bounded)."""

    def __init__(self, limit: int = ROUTED_LIMIT, report_limit: int = REPORT_LIMIT):
        self.limit, self.report_limit = limit, report_limit
        self._keys: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def note(self, rid: str, key: str) -> None:
        """`rid` was resolved to store key `key` and brought into host memory just now."""
        self._keys[rid] = key
        self._keys.move_to_end(rid)
        while len(self._keys) > self.limit:
            self._keys.popitem(last=False)

    def host_ids(self, host_keys: Iterable[str], exclude: Container[str] = ()) -> list[str]:
        """The routing ids whose adapter is in host memory now (`host_keys`), most recent first,
        at most `report_limit`, leaving out `exclude` (those Ray reports as held in a slot)."""
        resident = set(host_keys)
        found: list[str] = []
        for rid, key in reversed(self._keys.items()):
            if len(found) == self.report_limit:
                break
            if key in resident and rid not in exclude:
                found.append(rid)
        return found
