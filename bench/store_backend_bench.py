"""Adapter cold-load latency by blob backend: local directory vs S3 (moto on loopback), the
local blob-cache path of S3, and the host-cache hit path (registry: SQLite in every case)."""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lora_bench import make_random_adapters, open_store

_AWS_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


@dataclass(frozen=True)
class BackendLoad:
    rank: int
    size_bytes: int
    local_ms: float          # directory blob -> host (read, sha256, parse)
    s3_cold_ms: float        # S3 GET -> host
    s3_cached_ms: float      # S3 blob already in the local disk cache -> host
    host_hit_ms: float       # host cache hit (no I/O)


@contextlib.contextmanager
def moto_endpoint():
    """moto's S3 on 127.0.0.1 (free port) with AWS_* pointing at it, for the duration."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    env = {**_AWS_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.get_host_and_port()[1]}"}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        boto3.session.Session().client("s3").create_bucket(Bucket="bench")
        yield "s3://bench/adapters"
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
        server.stop()


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def run_backend_load(model_dir: Path, ranks=(8, 64), repeats: int = 5, log=print) -> list[BackendLoad]:
    from dataclasses import replace

    results = []
    with tempfile.TemporaryDirectory() as tmp, moto_endpoint() as blobs_url:
        tmp = Path(tmp)
        for rank in ranks:
            paths = make_random_adapters(model_dir, tmp / f"r{rank}", repeats, rank=rank, seed=rank)
            local = open_store(tmp / f"local-{rank}", model_dir)
            shared = open_store(tmp / f"s3-{rank}", model_dir)
            shared.close()
            shared = type(shared)(shared.root, replace(shared.config, blobs_url=f"{blobs_url}/r{rank}"), shared.base)
            samples: dict[str, list[float]] = {"local": [], "cold": [], "cached": [], "hit": []}
            for path in paths:
                key = local.register_path(path.name, path).key
                local.cache.pop(key)
                samples["local"].append(_timed(lambda: local.load(key)))
                record = shared.register_path(path.name, path)
                shared.cache.pop(record.key)
                shared._blobs.cache.drop(record.sha256)                  # noqa: SLF001 - force a GET
                samples["cold"].append(_timed(lambda: shared.load(record.key)))
                shared.cache.pop(record.key)
                samples["cached"].append(_timed(lambda: shared.load(record.key)))
                samples["hit"].append(_timed(lambda: shared.load(record.key)))
            local.close()
            shared.close()
            size = sum(p.stat().st_size for p in paths[0].iterdir())
            row = BackendLoad(rank, size, *(_median_ms(samples[k]) for k in ("local", "cold", "cached", "hit")))
            log(f"  rank {rank}: local {row.local_ms:.1f} ms, s3 cold {row.s3_cold_ms:.1f} ms, "
                f"s3 disk-cached {row.s3_cached_ms:.1f} ms, host hit {row.host_hit_ms:.3f} ms")
            results.append(row)
    return results
