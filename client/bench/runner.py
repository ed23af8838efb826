"""Drive the workload over `AsyncClient.generate_stream` and time every streamed chunk.

Closed loop (`concurrency`): that many workers each send their next request as soon as the
previous one finishes. Open loop (`request_rate`): requests are sent at Poisson arrival times
(exponential gaps, seeded), optionally capped at `max_concurrency` in flight. Warm-up requests
run first, closed loop, and are not recorded.
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO

from ..async_client import AsyncClient
from ..errors import LoraplexError
from .config import BenchConfig
from .workload import BenchRequest, build_requests


@dataclass
class RequestRecord:
    """Client-side timings of one request, in seconds since the run started."""

    index: int
    adapter_id: str | None
    sent_s: float
    chunk_s: list[float] = field(default_factory=list)        # arrival of each chunk carrying tokens
    chunk_tokens: list[int] = field(default_factory=list)     # tokens in that chunk
    done_s: float | None = None
    prompt_tokens: int | None = None                          # the server's count (last chunk's usage)
    error: str | None = None                                  # gRPC status code name when it failed
    cached_tokens: int = 0                                    # of them found in the server's prefix cache
    text: str = ""                                            # the output (multi-turn resends it)

    @property
    def ok(self) -> bool:
        return self.error is None and self.done_s is not None

    @property
    def output_tokens(self) -> int:
        return sum(self.chunk_tokens)


@dataclass(frozen=True)
class RunResult:
    config: BenchConfig
    records: list[RequestRecord]
    duration_s: float          # first send to last completion of the measured requests


class Progress:
    """A one-line live progress display on a terminal stream (stderr)."""

    def __init__(self, total: int, enabled: bool, stream: TextIO = sys.stderr):
        self.total, self.enabled, self.stream = total, enabled, stream
        self.done = self.errors = self.tokens = 0
        self.started = time.perf_counter()

    def update(self, record: RequestRecord) -> None:
        self.done += 1
        self.errors += not record.ok
        self.tokens += record.output_tokens
        if self.enabled:
            elapsed = time.perf_counter() - self.started
            self.stream.write(f"\r[bench] {self.done}/{self.total} requests, {self.errors} errors, "
                              f"{elapsed:6.1f}s, {self.tokens / max(elapsed, 1e-9):7.1f} tok/s ")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


async def send_one(client: Any, request: BenchRequest, clock: Callable[[], float],
                   timeout_s: float, history: str = "") -> RequestRecord:
    """One streamed, greedy, ignore_eos request (after `history`, a multi-turn conversation so
    far); errors are recorded, never raised."""
    record = RequestRecord(request.index, request.adapter_id, clock())
    try:
        stream = client.generate_stream(history + request.prompt, request.adapter_id, timeout=timeout_s,
                                        max_new_tokens=request.max_new_tokens, temperature=0.0, ignore_eos=True)
        async for chunk in stream:
            num_tokens = _num_tokens(chunk)
            if num_tokens:
                record.chunk_s.append(clock())
                record.chunk_tokens.append(num_tokens)
            record.text += getattr(chunk, "text", "") or ""
            if chunk.usage is not None:
                record.prompt_tokens = chunk.usage.prompt_tokens
                record.cached_tokens = getattr(chunk.usage, "cached_tokens", 0)
        record.done_s = clock()
    except LoraplexError as error:
        record.error = getattr(error.code, "name", str(error.code))
    return record


def _num_tokens(chunk) -> int:
    """Tokens in a chunk: the gRPC SDK's token_ids, or the HTTP driver's count (openai_client.py)."""
    count = getattr(chunk, "num_tokens", None)
    return count if count is not None else len(chunk.token_ids)


async def _closed_loop(client: AsyncClient, requests: list[BenchRequest], workers: int,
                       clock: Callable[[], float], config: BenchConfig,
                       progress: Progress | None) -> list[RequestRecord]:
    pending = iter(requests)
    records: list[RequestRecord] = []

    async def worker() -> None:
        for request in pending:           # a shared iterator: each request goes to one worker
            record = await send_one(client, request, clock, config.timeout_s)
            records.append(record)
            if progress:
                progress.update(record)

    await asyncio.gather(*(worker() for _ in range(max(1, min(workers, len(requests))))))
    return records


async def _conversations(client: Any, requests: list[BenchRequest], workers: int,
                         clock: Callable[[], float], config: BenchConfig,
                         progress: Progress | None) -> list[RequestRecord]:
    """Closed loop over conversations: each worker runs one conversation's turns in order, each
    turn sending the conversation so far (earlier prompts and the server's answers) + its message."""
    by_conversation: dict[int, list[BenchRequest]] = {}
    for request in requests:
        by_conversation.setdefault(request.conversation or 0, []).append(request)
    pending = iter(by_conversation.values())
    records: list[RequestRecord] = []

    async def worker() -> None:
        for turns in pending:
            history = ""
            for request in turns:
                record = await send_one(client, request, clock, config.timeout_s, history)
                records.append(record)
                if progress:
                    progress.update(record)
                if not record.ok:
                    break
                history += request.prompt + record.text + "\n"

    await asyncio.gather(*(worker() for _ in range(max(1, min(workers, len(by_conversation))))))
    return records


def poisson_offsets(count: int, rate: float, rng: random.Random) -> list[float]:
    """Send times (s from start) of `count` Poisson arrivals at `rate`/s; all 0 when rate is inf."""
    if math.isinf(rate):
        return [0.0] * count
    offsets, now = [], 0.0
    for _ in range(count):
        offsets.append(now)
        now += rng.expovariate(rate)
    return offsets


async def _open_loop(client: AsyncClient, requests: list[BenchRequest], config: BenchConfig,
                     clock: Callable[[], float], progress: Progress | None) -> list[RequestRecord]:
    limit = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
    offsets = poisson_offsets(len(requests), float(config.request_rate), random.Random(config.seed + 7))

    async def fire(request: BenchRequest) -> RequestRecord:
        if limit is None:
            record = await send_one(client, request, clock, config.timeout_s)
        else:
            async with limit:
                record = await send_one(client, request, clock, config.timeout_s)
        if progress:
            progress.update(record)
        return record

    tasks = []
    for request, offset in zip(requests, offsets):
        delay = offset - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(fire(request)))
    return list(await asyncio.gather(*tasks))


async def run_benchmark(client: AsyncClient, config: BenchConfig) -> RunResult:
    """Warm up, then run the measured requests; returns every request's timings."""
    closed = _conversations if config.workload == "multi-turn" else _closed_loop
    if config.warmup:
        warm = build_requests(config, count=config.warmup, seed_offset=1)
        await closed(client, warm, config.concurrency or config.max_concurrency or config.warmup,
                     time.perf_counter, config, None)
    requests = build_requests(config)
    started = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - started

    progress = Progress(len(requests), config.progress)
    try:
        if config.mode == "closed":
            records = await closed(client, requests, int(config.concurrency), clock, config, progress)
        else:
            records = await _open_loop(client, requests, config, clock, progress)
    finally:
        progress.close()
    records.sort(key=lambda r: r.index)
    finished = [r.done_s for r in records if r.done_s is not None]
    return RunResult(config, records, max(finished, default=clock()))
