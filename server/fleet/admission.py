"""The front end's view of the replicas and its bounded queue (issue 37 items 4 and 5).

`FleetView` is refreshed from Ray Serve's status once a second: how many replicas are running.
Health is answered from it in the front end (never routed to a busy replica), and calls are
refused at once with UNAVAILABLE while no replica runs. `Admission` bounds the generation calls
in flight through the front end to what the running replicas accept (each: `--max-num-seqs`
running + `--max-queued-requests` waiting), as one `loraplex serve` bounds its queue; above it a
call gets RESOURCE_EXHAUSTED with a retry delay instead of waiting in Ray's router without bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from ..service.errors import ServiceError

RETRY_AFTER_S = 1.0


@dataclass
class FleetView:
    """What the front end knows about the replicas."""

    running: int = 0
    draining: bool = False

    @property
    def serving(self) -> bool:
        return self.running > 0 and not self.draining


class Admission:
    """Counts generation calls in flight; `enter()` raises ServiceError when the fleet is full."""

    def __init__(self, view: FleetView, per_replica: int):
        self.view = view
        self.per_replica = per_replica          # --max-num-seqs + --max-queued-requests
        self.in_flight = 0

    @property
    def limit(self) -> int:
        return self.view.running * self.per_replica

    def enter(self) -> None:
        if self.view.draining:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the fleet is shutting down; retry on another one")
        if not self.view.running:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "no replica is running yet; retry shortly",
                               retry_after_s=RETRY_AFTER_S)
        if self.in_flight >= self.limit:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the fleet's queue is full ({self.limit} requests in flight); retry shortly",
                               retry_after_s=RETRY_AFTER_S)
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1


def running_replicas(app_name: str, deployment: str) -> int:
    """Replicas of `deployment` Ray Serve reports RUNNING (blocking: call from a thread)."""
    from ray import serve

    status = serve.status().applications.get(app_name)
    if status is None or deployment not in status.deployments:
        return 0
    return int(status.deployments[deployment].replica_states.get("RUNNING", 0))
