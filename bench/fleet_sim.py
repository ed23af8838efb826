"""Routing simulation for `loraplex fleet`: which replica gets a request, and what it costs.

Pure Python + numpy, no model: a fleet of R replicas, each holding at most `capacity` adapters
(LRU, like Ray's multiplexed loader sized to the engine's slots); A adapters with Zipf(s)
popularity; Poisson arrivals at `utilization` of the fleet's capacity, exponential service
times, at most `max_ongoing` requests per replica. Three routers:

- multiplex: Ray Serve's policy for requests with a multiplexed model id: power of two choices
  among the replicas that hold the adapter; when there are none, or both picks are full, power
  of two among the replicas with the fewest adapters loaded.
- round-robin: replica i mod R.
- least-loaded: the replica with the fewest requests in flight (ties at random).
- residency: what the fleet's front end routes with (server/fleet/routing.py, ResidencyRouter):
  power of two choices among the replicas with the adapter in a device slot; if none or both
  picks are full, among those with it in host memory (a slot copy away, no fetch from the
  store; the replicas report it as a routing stat); else the less loaded of two replicas
  drawn from all of them.

Each replica also keeps a host tier (`host_capacity` adapters, LRU): a request whose adapter is
not in a slot but in host memory costs a slot copy; one in neither costs a fetch from the store.

Reported over the requests after warm-up: adapter loads per 1,000 requests (a request routed to
a replica that does not hold its adapter costs one load) and load imbalance (max / mean requests
per replica; 1.0 is even). Run: `python bench/fleet_sim.py` (the BENCHMARKS.md section on stdout, plot to
bench/plots/fleet_sim.png); `--quick` for a smoke run.
"""

from __future__ import annotations

import argparse
import heapq
import random
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

POLICIES = ("multiplex", "round-robin", "least-loaded", "residency")
FETCH_POLICIES = ("multiplex", "residency")


@dataclass(frozen=True)
class SimConfig:
    replicas: int
    adapters: int
    requests: int
    warmup: int
    capacity: int = 32
    host_capacity: int = 128
    max_ongoing: int = 8
    utilization: float = 0.7
    zipf_s: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class SimResult:
    config: SimConfig
    policy: str
    loads_per_1k: float
    imbalance: float
    fetches_per_1k: float = 0.0      # loads that missed the host tier too (a fetch from the store)


class Fleet:
    """Replica state: adapters held (LRU), requests in flight, completion events."""

    def __init__(self, config: SimConfig, rng: random.Random):
        self.config = config
        self.rng = rng
        self.held = [OrderedDict() for _ in range(config.replicas)]
        self.holders: dict[int, set[int]] = {}
        self.hosted = [OrderedDict() for _ in range(config.replicas)]
        self.host_holders: dict[int, set[int]] = {}
        self.in_flight = np.zeros(config.replicas, dtype=np.int64)
        self.finishing: list[tuple[float, int]] = []
        self.next_rr = 0

    def advance(self, now: float) -> None:
        while self.finishing and self.finishing[0][0] <= now:
            _, replica = heapq.heappop(self.finishing)
            self.in_flight[replica] -= 1

    def route(self, policy: str, adapter: int) -> int:
        if policy == "round-robin":
            self.next_rr = (self.next_rr + 1) % self.config.replicas
            return self.next_rr
        if policy == "least-loaded":
            low = np.flatnonzero(self.in_flight == self.in_flight.min())
            return int(low[self.rng.randrange(len(low))])
        holders = self.holders.get(adapter)
        if holders:
            pick = self._pow2(list(holders))
            if self.in_flight[pick] < self.config.max_ongoing:
                return pick
        if policy == "residency":
            hosts = self.host_holders.get(adapter, set()) - (holders or set())     # slot holders were rank 1
            if hosts:
                pick = self._pow2(list(hosts))
                if self.in_flight[pick] < self.config.max_ongoing:
                    return pick
            return self._pow2(list(range(self.config.replicas)))
        counts = np.fromiter((len(h) for h in self.held), dtype=np.int64, count=self.config.replicas)
        return self._pow2(np.flatnonzero(counts == counts.min()).tolist())

    def _pow2(self, candidates: list[int]) -> int:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self.rng.sample(candidates, 2)
        return a if self.in_flight[a] <= self.in_flight[b] else b

    def serve(self, replica: int, adapter: int, now: float, service_s: float) -> tuple[bool, bool]:
        """Start the request; (loaded into a slot, fetched from the store)."""
        self.in_flight[replica] += 1
        heapq.heappush(self.finishing, (now + service_s, replica))
        fetched = not _touch(self.hosted[replica], self.host_holders, adapter, replica, self.config.host_capacity)
        loaded = not _touch(self.held[replica], self.holders, adapter, replica, self.config.capacity)
        return loaded, fetched


def _touch(tier: OrderedDict, holders: dict[int, set[int]], adapter: int, replica: int, capacity: int) -> bool:
    """Use `adapter` in one replica's LRU tier; True when it was already there."""
    if adapter in tier:
        tier.move_to_end(adapter)
        return True
    if len(tier) >= capacity:
        evicted, _ = tier.popitem(last=False)
        holders[evicted].discard(replica)
    tier[adapter] = True
    holders.setdefault(adapter, set()).add(replica)
    return False


def zipf_stream(config: SimConfig, rng: np.random.Generator) -> np.ndarray:
    """`requests + warmup` adapter ids, rank k drawn with probability ~ 1 / k**s."""
    weights = 1.0 / np.arange(1, config.adapters + 1) ** config.zipf_s
    return rng.choice(config.adapters, size=config.requests + config.warmup, p=weights / weights.sum())


def simulate(config: SimConfig, policy: str) -> SimResult:
    rng = random.Random(config.seed)
    nprng = np.random.default_rng(config.seed)
    adapters = zipf_stream(config, nprng)
    total = len(adapters)
    gaps = nprng.exponential(1.0 / (config.utilization * config.replicas * 1.0), size=total)
    service = nprng.exponential(1.0, size=total)
    fleet = Fleet(config, rng)
    served = np.zeros(config.replicas, dtype=np.int64)
    loads = fetches = 0
    now = 0.0
    for i in range(total):
        now += gaps[i]
        fleet.advance(now)
        replica = fleet.route(policy, int(adapters[i]))
        loaded, fetched = fleet.serve(replica, int(adapters[i]), now, service[i])
        if i >= config.warmup:
            loads += loaded
            fetches += fetched
            served[replica] += 1
    return SimResult(config, policy, 1000.0 * loads / config.requests, float(served.max() / served.mean()),
                     1000.0 * fetches / config.requests)


def run_grid(replica_counts, adapter_counts, requests_per_replica: int, min_requests: int) -> list[SimResult]:
    results = []
    for replicas in replica_counts:
        for adapters in adapter_counts:
            requests = max(min_requests, requests_per_replica * replicas)
            config = SimConfig(replicas=replicas, adapters=adapters, requests=requests, warmup=requests // 2)
            for policy in POLICIES:
                results.append(simulate(config, policy))
    return results


def table(results: list[SimResult]) -> str:
    lines = ["| replicas | adapters | requests | " + " | ".join(f"{p} loads/1k" for p in POLICIES) + " | "
             + " | ".join(f"{p} fetches/1k" for p in FETCH_POLICIES) + " | "
             + " | ".join(f"{p} imbalance" for p in POLICIES) + " |",
             "|---:|---:|---:|" + "---:|" * (2 * len(POLICIES) + len(FETCH_POLICIES))]
    keyed = {(r.config.replicas, r.config.adapters, r.policy): r for r in results}
    for replicas, adapters in dict.fromkeys((r.config.replicas, r.config.adapters) for r in results):
        row = [keyed[(replicas, adapters, p)] for p in POLICIES]
        lines.append(f"| {replicas} | {adapters:,} | {row[0].config.requests:,} | "
                     + " | ".join(f"{r.loads_per_1k:.0f}" for r in row) + " | "
                     + " | ".join(f"{keyed[(replicas, adapters, p)].fetches_per_1k:.0f}" for p in FETCH_POLICIES)
                     + " | " + " | ".join(f"{r.imbalance:.2f}" for r in row) + " |")
    return "\n".join(lines)


def plot(results: list[SimResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    adapter_counts = sorted({r.config.adapters for r in results})
    figure, axes = plt.subplots(1, len(adapter_counts), figsize=(4.2 * len(adapter_counts), 3.6), sharey=True)
    for axis, adapters in zip(np.atleast_1d(axes), adapter_counts):
        for policy in POLICIES:
            points = sorted((r.config.replicas, r.loads_per_1k) for r in results
                            if r.config.adapters == adapters and r.policy == policy)
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=policy)
        axis.set_xscale("log", base=2)
        axis.set_title(f"{adapters:,} adapters (Zipf 1.0)")
        axis.set_xlabel("replicas")
    np.atleast_1d(axes)[0].set_ylabel("adapter loads per 1,000 requests")
    np.atleast_1d(axes)[0].legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def section_fleet_sim(quick: bool, plot_dir: Path) -> str:
    """Markdown section for BENCHMARKS.md (a seeded simulation, not a timing: same numbers every run)."""
    if quick:
        results = run_grid((8,), (1000,), requests_per_replica=200, min_requests=2000)
    else:
        results = run_grid(REPLICA_COUNTS, ADAPTER_COUNTS, requests_per_replica=200, min_requests=40_000)
        plot(results, plot_dir / "fleet_sim.png")
    config = results[0].config
    return "\n".join([
        "## 10. Fleet routing simulation (`bench/fleet_sim.py`)",
        "",
        "A seeded simulation, not a measurement: the plan for many replicas on paper (the local fleet tests "
        "prove the mechanism). Each replica holds at most "
        f"{config.capacity} adapters (LRU) and takes at most {config.max_ongoing} requests at once; Poisson "
        f"arrivals at {config.utilization:.0%} of the fleet's capacity, exponential service times, adapters "
        f"drawn Zipf({config.zipf_s:g}); the first half of the requests warm the replicas up, the second "
        "half is counted. multiplex = Ray Serve's policy for requests with a multiplexed model id (power "
        "of two choices among replicas holding the adapter; else among those with the fewest adapters); "
        "round-robin; least-loaded = fewest requests in flight; residency = the fleet's own router "
        "(server/fleet/routing.py): a replica with the adapter in a slot, else one with it in host memory "
        f"(each replica's host tier holds {config.host_capacity} adapters, LRU; replicas report it as a routing "
        "stat), else the less loaded of two replicas (power of two choices among the holders at each step). Loads/1k = adapter loads into a slot per 1,000 "
        "requests (a request sent to a replica without its adapter in a slot); fetches/1k = those that missed "
        "host memory too (a fetch from the store); imbalance = max / mean requests per replica (1.00 = even).",
        "",
        table(results),
        "",
        reading(results),
        "",
        "" if quick else "![adapter loads per 1,000 requests](bench/plots/fleet_sim.png)",
        "",
    ])


def reading(results: list[SimResult]) -> str:
    """One paragraph computed from the results (what the table says)."""
    return _reading_multiplex(results) + " " + _reading_residency(results)


def _reading_residency(results: list[SimResult]) -> str:
    mux = {(r.config.replicas, r.config.adapters): r for r in results if r.policy == "multiplex"}
    res = {(r.config.replicas, r.config.adapters): r for r in results if r.policy == "residency"}
    cut = [(1 - res[k].fetches_per_1k / mux[k].fetches_per_1k) if mux[k].fetches_per_1k else 0.0 for k in mux]
    worse = max(res[k].imbalance / mux[k].imbalance for k in mux)
    return (f"Residency-aware routing (the fleet's router: host tier as the second preference) changes store fetches per 1,000 "
            f"requests by {-100 * max(cut):+.0f}% to {-100 * min(cut):+.0f}% against multiplex, with imbalance "
            f"at most {worse:.2f}x multiplex's.")


def _reading_multiplex(results: list[SimResult]) -> str:
    mux = [r for r in results if r.policy == "multiplex"]
    worst = max(mux, key=lambda r: r.imbalance)
    others = [r.loads_per_1k for r in results if r.policy in ("round-robin", "least-loaded")]
    return (f"Reading: Ray's multiplex routing needs {min(r.loads_per_1k for r in mux):.0f}-"
            f"{max(r.loads_per_1k for r in mux):.0f} loads per 1,000 requests where round-robin and least-loaded "
            f"need {min(others):.0f}-{max(others):.0f}, and its advantage grows with the fleet (more replicas "
            "hold more of the adapters). Its cost is balance: the replicas holding the hottest adapters take "
            f"more of the traffic (up to {worst.imbalance:.2f}x the mean at {worst.config.replicas} replicas and "
            f"{worst.config.adapters:,} adapters), since a hot adapter only spreads to another replica once its "
            "holders are full (`--max-ongoing-requests`); round-robin and least-loaded stay even but load an "
            "adapter on most requests.")


REPLICA_COUNTS, ADAPTER_COUNTS = (8, 64, 512), (1_000, 10_000, 100_000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument("--plot", default=str(Path(__file__).parent / "plots" / "fleet_sim.png"),
                        help="where the plot goes (its directory is used)")
    args = parser.parse_args()
    print(section_fleet_sim(args.quick, Path(args.plot).parent))

if __name__ == "__main__":
    main()
