"""`loraplex bench`: a gRPC load generator in the style of `vllm bench serve`.

config (options) -> workload (requests) -> runner (timings) -> stats (metrics) -> report (table, JSON, plots).
"""

from .config import BenchConfig
from .runner import RequestRecord, run_benchmark
from .stats import BenchStats, compute_stats
from .workload import BenchRequest, build_requests

__all__ = ["BenchConfig", "BenchRequest", "BenchStats", "RequestRecord", "build_requests", "compute_stats",
           "run_benchmark"]
