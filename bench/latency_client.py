"""The client side of bench/latency_bench.py, in spawned processes of its own.

A `Worker` is one client process that runs one job at a time, sent over a pipe: a timed gRPC
stream, `batch` streams at once, a health prober, or a loop of large interfering requests. The
last two run until the bench sends STOP. Every time is `time.perf_counter()` (CLOCK_MONOTONIC
on Linux: one clock for every process). This module imports neither torch nor the server.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import multiprocessing
import time
from typing import Any, Callable

PROMPT_BYTES = 3_900_000          # issue 36's large prompt: tokenized, then refused for length
OVERSIZE_BYTES = 4_500_000        # above the server's 4 MiB --max-message-bytes: refused by its size
HEALTH_INTERVAL_S = 0.025
INTERFERE_PERIOD_S = 0.1          # one interfering request at a time, at most ten a second
STOP = "stop"
TEXT = ("A lighthouse keeper finds a message in a bottle; a storm, an old map, a seagull called Pip "
        "and a visitor from a faraway island follow. ")


# ---- the process ------------------------------------------------------------------------------
class Worker:
    """One spawned client process; `run` a job and wait, or `start` it and `stop` it later."""

    def __init__(self):
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve_jobs, args=(child,), name="latency-client", daemon=True)

    def __enter__(self) -> "Worker":
        self._process.start()
        return self

    def __exit__(self, *_exc) -> None:
        try:
            self._conn.send(None)
        except OSError:
            pass
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    def start(self, job: str, **kwargs: Any) -> None:
        self._conn.send((job, kwargs))

    def result(self, timeout_s: float = 900) -> Any:
        if not self._conn.poll(timeout_s):
            raise TimeoutError(f"latency client: no result in {timeout_s:g} s")
        ok, value = self._conn.recv()
        if not ok:
            raise RuntimeError(f"latency client: {value}")
        return value

    def run(self, job: str, **kwargs: Any) -> Any:
        self.start(job, **kwargs)
        return self.result()

    def stop(self) -> Any:
        """Tell a running `until STOP` job to finish; its result."""
        self._conn.send(STOP)
        return self.result()


def _serve_jobs(conn) -> None:
    while (message := conn.recv()) is not None:
        if message == STOP:                # the job it was meant for had already failed
            continue
        job, kwargs = message
        try:
            conn.send((True, JOBS[job](conn, **kwargs)))
        except Exception as error:  # noqa: BLE001 - reported to the bench, which raises it
            conn.send((False, f"{job}: {type(error).__name__}: {error}"))


def _until_stop(conn) -> bool:
    if conn.poll():
        conn.recv()
        return False
    return True


# ---- jobs -------------------------------------------------------------------------------------
def job_stream(_conn, port: int, prompt: str, tokens: int) -> list[float]:
    """One greedy `ignore_eos` stream through the sync SDK: the arrival time of each token."""
    from loraplex.client import Client

    times = []
    with Client(f"127.0.0.1:{port}", timeout=300) as client:
        for chunk in client.generate_stream(prompt, max_new_tokens=tokens, temperature=0.0, ignore_eos=True):
            if chunk.token_ids:
                times.append(time.perf_counter())
    return times


def job_streams(_conn, port: int, prompts: list[str], tokens: int, constrained: int = 0,
                schema: dict | None = None) -> list[dict]:
    """All `prompts` streamed at once (the first `constrained` by `schema`, the rest `ignore_eos`):
    per request its send time and each token chunk's arrival and size."""
    return asyncio.run(_streams(port, prompts, tokens, constrained, schema))


async def _streams(port: int, prompts: list[str], tokens: int, constrained: int, schema: dict | None) -> list[dict]:
    from loraplex.client import AsyncClient

    async def one(client: AsyncClient, prompt: str, options: dict) -> dict:
        record = {"sent": time.perf_counter(), "chunk_s": [], "chunk_tokens": []}
        async for chunk in client.generate_stream(prompt, max_new_tokens=tokens, temperature=0.0, **options):
            if chunk.token_ids:
                record["chunk_s"].append(time.perf_counter())
                record["chunk_tokens"].append(len(chunk.token_ids))
        return record

    async with AsyncClient(f"127.0.0.1:{port}", timeout=600) as client:
        return list(await asyncio.gather(*(one(client, prompt, dict(json_schema=schema) if i < constrained
                                                else dict(ignore_eos=True)) for i, prompt in enumerate(prompts))))


def job_health(conn, port: int, http_port: int) -> list[tuple[float, float, str]]:
    """grpc.health.v1 Check and HTTP GET /health, alternating every HEALTH_INTERVAL_S until STOP:
    (sent, seconds to the answer, kind) of each."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    check, request = health_pb2_grpc.HealthStub(channel).Check, health_pb2.HealthCheckRequest()
    web = http.client.HTTPConnection("127.0.0.1", http_port, timeout=60)

    def http_health() -> None:
        web.request("GET", "/health")
        response = web.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"/health answered {response.status}")
    probes = (("gRPC Check", lambda: check(request, timeout=60)), ("HTTP /health", http_health))
    for _kind, probe in probes:             # connect both first
        probe()
    samples = []
    try:
        while _until_stop(conn):
            for kind, probe in probes:
                started = time.perf_counter()
                probe()
                samples.append((started, time.perf_counter() - started, kind))
                time.sleep(HEALTH_INTERVAL_S)
    finally:
        web.close()
        channel.close()
    return samples


def job_interfere(conn, kind: str, port: int, http_port: int, model: str) -> list[tuple[float, float, str]]:
    """`kind`'s large request until STOP, one at a time, the next as soon as the last is answered
    but at most one per INTERFERE_PERIOD_S (a refusal by size takes milliseconds: back to back, it
    would be a flood): (sent, answered, outcome) of each."""
    send, close = INTERFERENCES[kind](port, http_port, model)
    sent = []
    try:
        while _until_stop(conn):
            started = time.perf_counter()
            outcome = send()
            sent.append((started, time.perf_counter(), outcome))
            time.sleep(max(0.0, started + INTERFERE_PERIOD_S - time.perf_counter()))
    finally:
        close()
    return sent


JOBS: dict[str, Callable[..., Any]] = {"stream": job_stream, "streams": job_streams, "health": job_health,
                                       "interfere": job_interfere}


# ---- the interfering requests (each payload built once) --------------------------------------
def big_text(num_bytes: int) -> str:
    return (TEXT * (num_bytes // len(TEXT) + 1))[:num_bytes]


def grpc_prompt(port: int, _http_port: int, _model: str) -> tuple[Callable[[], str], Callable[[], None]]:
    import grpc

    from loraplex.v1 import generation_pb2 as pb
    from loraplex.v1 import generation_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", -1)])
    generate = generation_pb2_grpc.GenerationServiceStub(channel).Generate
    request = pb.GenerateRequest(input=pb.GenerationInput(prompt=big_text(PROMPT_BYTES),
                                                          sampling=pb.SamplingParams(max_new_tokens=4)))

    def send() -> str:
        try:
            generate(request, timeout=300)
            return "OK"
        except grpc.RpcError as error:
            return error.code().name
    return send, channel.close


def http_prompt(_port: int, http_port: int, model: str, num_bytes: int = PROMPT_BYTES):
    body = json.dumps({"model": model, "prompt": big_text(num_bytes), "max_tokens": 4}).encode()
    connection = http.client.HTTPConnection("127.0.0.1", http_port, timeout=300)

    def send() -> str:
        try:
            connection.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            if response.getheader("connection", "").lower() == "close":
                connection.close()
            return f"HTTP {response.status}"
        except (ConnectionError, http.client.HTTPException) as error:     # closed mid-body: reconnect next
            connection.close()
            return type(error).__name__
    return send, connection.close


def http_oversize(port: int, http_port: int, model: str):
    return http_prompt(port, http_port, model, OVERSIZE_BYTES)


INTERFERENCES = {"gRPC, 3.9 MB prompt tokenized, too long": grpc_prompt,
                 "HTTP, 3.9 MB prompt tokenized, too long": http_prompt,
                 "HTTP, 4.5 MB body over the size limit": http_oversize}
