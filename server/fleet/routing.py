"""Residency-aware routing: the Ray Serve request router the fleet's front end uses (issue 35).

For a generation request whose adapter has a routing id (wire.routing_id, Ray's multiplexed
model id), the replicas are tried in ranks:

1. those holding the adapter in a device slot (Ray's multiplexed model ids: the replica's
   `warm_adapter` loader holds it; served with no load),
2. those holding it in host memory (the `host` routing stat each replica reports, residency.py:
   a slot copy away, no fetch from the store),
3. all replicas.

Within a rank: power of two choices (two at random, Ray then takes the one with fewer requests
in flight and skips full ones); when both picks of a rank are full the next rank is tried at
once, so busy holders do not hold a request back; when every rank's picks are full, Ray backs
off and draws again. Requests without an adapter start at rank 3. bench/fleet_sim.py's `residency` policy simulates exactly this.

Ray's default (PowerOfTwoChoicesRequestRouter) knows rank 1 only, then prefers the replicas
with the fewest adapters, and keeps a set entry per routing id it could not match. This router
keeps no state per routing id (issue 37 item 3): its ranks come from the replicas' own bounded
reports, and the base class's per-id index of pending requests, which only FIFO-by-model
matching reads (not used here: a routed replica goes to the request it was chosen for), is
dropped as entries are added.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from .residency import HOST_STAT


def residency_ranks(replicas: Sequence[Any], rid: str) -> list[list[Any]]:
    """[slot holders, host-memory holders, all] for routing id `rid`; [all] without one.
    `replicas` have `multiplexed_model_ids` (a set) and `routing_stats` (a dict), as Ray's
    RunningReplica has."""
    everyone = list(replicas)
    if not rid:
        return [everyone]
    in_slot = [r for r in everyone if rid in r.multiplexed_model_ids]
    in_host = [r for r in everyone if r not in in_slot and rid in (r.routing_stats or {}).get(HOST_STAT, ())]
    return [in_slot, in_host, everyone]


def two_choices(replicas: Sequence[Any], rng: random.Random) -> list[Any]:
    """Two distinct replicas at random (all of them when there are fewer)."""
    return list(replicas) if len(replicas) <= 2 else rng.sample(list(replicas), 2)


class ResidencyRouter(RequestRouter):
    """Slot holder, then host-memory holder, then any replica; the less loaded of two in each."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._rng = random.Random()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        rid = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True     # all ranks full: Ray backs off
        return [two_choices(rank, self._rng) for rank in residency_ranks(candidate_replicas, rid) if rank]

    def _add_pending_request_to_indices(self, pending_request: PendingRequest) -> None:
        """The base class also indexes the request by its model id, for FIFO-by-model matching
        this router does not do; done entries there are only cleared by that matching, so each
        distinct routing id would stay (issue 37 item 3). Ray is pinned (pyproject.toml)."""
        super()._add_pending_request_to_indices(pending_request)
        self._pending_requests_by_model_id.pop(pending_request.metadata.multiplexed_model_id, None)

    def routing_state_size(self) -> int:
        """Entries this router keeps that could grow with distinct routing ids (tests: stays 0)."""
        return len(self._pending_requests_by_model_id)

    def view(self) -> dict[str, tuple[list[str], list[str]]]:
        """replica id -> (routing ids in a slot, routing ids in host memory), as this router sees them."""
        return {r.replica_id.unique_id: (sorted(r.multiplexed_model_ids),
                                         list((r.routing_stats or {}).get(HOST_STAT, ())))
                for r in self._replicas_list}
