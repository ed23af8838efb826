"""The fleet's residency-aware request router (issue 35) and its bounded state (issue 37 item 3):
slot holders first, then host-memory holders, then any replica; bench/fleet_sim.py's `residency`
policy ranks the same way. The real router on a real Ray cluster: tests/integration/test_fleet_residency.py."""

from __future__ import annotations

import asyncio
import importlib.util
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from loraplex.server.fleet.residency import HOST_STAT, HostIndex

pytest.importorskip("ray.serve")


@dataclass(frozen=True, eq=False)
class Replica:
    """What the router reads of a replica (Ray's RunningReplica has these two attributes)."""

    name: str
    multiplexed_model_ids: set = field(default_factory=set)
    routing_stats: dict = field(default_factory=dict)


def test_ranks_are_slot_then_host_then_everyone():
    from loraplex.server.fleet.routing import residency_ranks

    slot, host, other = Replica("s", {"r1"}), Replica("h", set(), {HOST_STAT: ["r1", "r2"]}), Replica("o")
    everyone = [other, host, slot]
    assert residency_ranks(everyone, "r1") == [[slot], [host], everyone]
    assert residency_ranks(everyone, "r2") == [[], [host], everyone]
    assert residency_ranks(everyone, "r3") == [[], [], everyone]
    assert residency_ranks(everyone, "") == [everyone]                  # no adapter: any replica
    both = Replica("b", {"r1"}, {HOST_STAT: ["r1"]})                       # a slot holder is not ranked twice
    assert residency_ranks([both], "r1") == [[both], [], [both]]


def test_router_chooses_two_per_rank_and_keeps_nothing_per_routing_id():
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
    from ray.serve.request_router import PendingRequest

    from loraplex.server.fleet.routing import ResidencyRouter

    async def run() -> None:
        router = ResidencyRouter(deployment_id=DeploymentID(name="r", app_name="a"),
                                 handle_source=DeploymentHandleSource.UNKNOWN)
        replicas = [Replica(f"x{i}") for i in range(5)] + [Replica("host", set(), {HOST_STAT: ["rid"]})]
        pending = PendingRequest(args=[], kwargs={}, metadata=RequestMetadata(
            request_id="q", internal_request_id="q", multiplexed_model_id="rid"))
        ranks = await router.choose_replicas(replicas, pending)
        assert ranks[0] == [replicas[-1]] and len(ranks[1]) == 2 and set(ranks[1]) <= set(replicas)
        assert pending.routing_context.should_backoff          # all ranks full: Ray backs off, no busy loop
        for i in range(2000):                                   # distinct routing ids, as a caller could send
            router._add_pending_request_to_indices(PendingRequest(args=[], kwargs={}, metadata=RequestMetadata(
                request_id=str(i), internal_request_id=str(i), multiplexed_model_id=f"a{i:024x}")))
        assert router.routing_state_size() == 0
        assert len(router._pending_requests_by_id) == 2000      # Ray's own per-request index (freed when routed)

    asyncio.run(run())


def test_the_deployment_uses_the_residency_router():
    from ray.serve.config import RequestRouterConfig

    from loraplex.server.fleet.app import deployment_options
    from loraplex.server.fleet.config import load_fleet_config
    from loraplex.server.fleet.routing import ResidencyRouter

    config, options = load_fleet_config({"replicas": "2"}, {})
    router = RequestRouterConfig(**deployment_options(config, options)["request_router_config"])
    chosen = router.get_request_router_class()               # Ray ships the class by value (cloudpickle)
    assert (chosen.__module__, chosen.__qualname__) == (ResidencyRouter.__module__, ResidencyRouter.__qualname__)
    assert router.request_routing_stats_period_s <= 2                  # replicas' host residency, fresh


def test_host_index_reports_host_resident_routing_ids_bounded():
    index = HostIndex(limit=3, report_limit=2)
    for rid, key in (("r1", "a@1"), ("r2", "b@1"), ("r3", "c@1"), ("r4", "d@1")):
        index.note(rid, key)
    assert len(index) == 3                                       # r1 forgotten (LRU)
    assert index.host_ids(["a@1", "b@1", "c@1", "d@1"]) == ["r4", "r3"]          # most recent first, bounded
    assert index.host_ids(["b@1", "d@1"], exclude={"r4"}) == ["r2"]               # held in a slot: Ray says so
    index.note("r2", "b@2")                                      # re-resolved to a new version
    assert index.host_ids(["b@1"]) == []


def _fleet_sim():
    path = Path(__file__).resolve().parents[2] / "bench" / "fleet_sim.py"
    spec = importlib.util.spec_from_file_location("fleet_sim", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                 # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_simulation_ranks_replicas_as_the_router_does():
    """Drive the simulated fleet; whenever a rank has replicas and none of them is full, the
    simulated `residency` pick is in the first such rank the real router computes."""
    from loraplex.server.fleet.routing import residency_ranks

    sim = _fleet_sim()
    config = sim.SimConfig(replicas=6, adapters=40, requests=0, warmup=0, capacity=3, host_capacity=8, max_ongoing=3)
    fleet = sim.Fleet(config, random.Random(1))
    rng, checked = random.Random(2), 0
    for step in range(3000):
        fleet.advance(step * 0.5)
        adapter = rng.randrange(config.adapters)
        views = [Replica(str(i), {adapter} if adapter in fleet.held[i] else set(),
                         {HOST_STAT: [adapter] if adapter in fleet.hosted[i] else []}) for i in range(config.replicas)]
        ranks = residency_ranks(views, adapter)
        pick = fleet.route("residency", adapter)
        for rank in ranks:
            free = [r for r in rank if fleet.in_flight[int(r.name)] < config.max_ongoing]
            if rank and len(free) == len(rank):
                assert views[pick] in rank, (step, adapter, pick)
                checked += 1
                break
            if rank and free:
                break                                             # a rank partly full: sampling decides
        fleet.serve(pick, adapter, step * 0.5, rng.expovariate(1.0))
    assert checked > 1000
