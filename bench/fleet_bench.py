"""One-replica `loraplex fleet` vs a plain `loraplex serve`: the cost of the front end's hop.

Same model, EngineConfig and workload as section 4 (`grpc_bench`): closed loop at concurrency
16 through `loraplex bench`'s runner (`AsyncClient.generate_stream`). Plain: the real server on
a loopback port in this process. Fleet: a private local Ray cluster in this process, the
fleet's front end (gRPC on loopback; Ray Serve's proxies off), one replica running the same engine (`start_fleet`, as `loraplex fleet` does). The
two sides alternate; each row is the mean of its runs, and the verdict uses the median of the
rounds' ratios. Target: fleet >= 0.85x plain.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from pathlib import Path

from grpc_bench import (Comparison, _LoopThread, _server_config, _start_server, _workload, comparison_section,
                        run_over_grpc)


def _start_one_replica_fleet(config):
    import ray

    from loraplex.server.fleet.app import start_fleet, wait_running
    from loraplex.server.fleet.config import FleetOptions

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")           # a private local cluster
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    # The replica reserves every core: Ray sets its OMP_NUM_THREADS (torch threads) from num_cpus, and
    # the plain server uses every core too.
    options = FleetOptions(replicas=1, replica_cpus=float(os.cpu_count()))
    running = start_fleet(replace(config, metrics_port=0, http_port=0), options, log=lambda _m: None)
    wait_running(running.app_name, timeout_s=900)
    return running


def run_fleet_bench(model_dir: Path, concurrency: int = 16, num_requests: int = 48, input_len: int = 64,
                    output_len: int = 32, rounds: int = 3, log=print) -> Comparison:
    import ray
    from ray import serve

    from loraplex.server.app import drain_and_stop

    bench_config, _requests = _workload(num_requests, concurrency, input_len, output_len)
    warm_config, _warm = _workload(2, 2, input_len, 4)
    plain_runs, fleet_runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        config = _server_config(model_dir, Path(tmp) / "store", concurrency)
        loop = _LoopThread()
        try:
            plain = loop.run(_start_server(config))
            fleet = _start_one_replica_fleet(config)
            for address in (f"127.0.0.1:{plain.port}", f"127.0.0.1:{fleet.port}"):
                run_over_grpc(address, warm_config)                      # untimed warm-up
            for round_index in range(rounds):
                plain_runs.append(run_over_grpc(f"127.0.0.1:{plain.port}", bench_config))
                fleet_runs.append(run_over_grpc(f"127.0.0.1:{fleet.port}", bench_config))
                log(f"  round {round_index + 1}: serve {plain_runs[-1].tok_s:.1f} tok/s, "
                    f"fleet {fleet_runs[-1].tok_s:.1f} tok/s")
            loop.run(drain_and_stop(plain, 1.0, log=lambda _m: None))
        finally:
            if ray.is_initialized():
                serve.shutdown()
                ray.shutdown()
            loop.close()
    return Comparison(concurrency, num_requests, input_len, output_len, tuple(plain_runs), tuple(fleet_runs))


def section_fleet(model_dir: Path, quick: bool) -> str:
    """Markdown section: one-replica fleet vs plain serve at the same closed-loop load."""
    sizes = dict(concurrency=4, num_requests=8, input_len=32, output_len=8, rounds=1) if quick else \
        dict(concurrency=16, num_requests=48, input_len=64, output_len=32)
    r = run_fleet_bench(model_dir, **sizes)
    return comparison_section(
        "## 9. One-replica fleet vs plain serve (the front end's hop)",
        f"Default model, float32, base model. {r.num_requests} requests, closed loop at concurrency "
        f"{r.concurrency}, ~{r.input_len}-token prompts, {r.output_len} generated tokens each (greedy, "
        "`ignore_eos`), through `loraplex bench`'s runner. `loraplex serve`: the real server in this process. "
        "`loraplex fleet`: a local Ray cluster, the fleet's front end (serve's limits, keys and health; Ray "
        "Serve's proxies off) and one replica with the same engine settings (the replica is a separate "
        "process; every chunk crosses front end -> replica -> front end through a Ray Serve handle). "
        "The two alternate; each row is the mean of its runs and the verdict uses the median of the rounds' ratios.",
        ("loraplex serve", "loraplex fleet, 1 replica"), r, "fleet / serve", 0.85)
