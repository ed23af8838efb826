"""Run a real loraplex gRPC server in-process on a loopback port, on its own event-loop thread.

Tests talk to it with ordinary synchronous stubs, exactly like a client would.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any, Iterator

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class LoopThread:
    """An asyncio event loop running forever on a daemon thread."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 300) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def rich_details(error: grpc.RpcError) -> dict[str, Any]:
    """Decode google.rpc details: {'violations': {field: description}, 'retry_delay_s': float}."""
    status = rpc_status.from_call(error)
    found: dict[str, Any] = {"violations": {}}
    for detail in status.details if status is not None else ():
        bad = error_details_pb2.BadRequest()
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(bad):
            found["violations"].update({v.field: v.description for v in bad.field_violations})
        elif detail.Unpack(retry):
            found["retry_delay_s"] = retry.retry_delay.ToNanoseconds() / 1e9
    return found


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


ENGINE_PROCESS_ENV = "LORAPLEX_TEST_ENGINE_PROCESS"     # set by `pytest --engine-process on|off`


async def start_full_server(config, engine_process: bool | None = None):
    """gRPC server + store + engine on the tiny model, exactly as `loraplex serve` wires them.

    engine_process: which EngineClient (True: the engine-core process, False: in-process);
    None: `pytest --engine-process on|off` when given, else the server's default. Tests that
    reach into the engine object itself (fault injection) pass False."""
    import os
    from dataclasses import replace

    import asyncio

    from loraplex.server.app import attach_engine, drain_and_stop, load_engine, start_grpc
    from loraplex.server.metrics import Metrics

    chosen = os.environ.get(ENGINE_PROCESS_ENV)
    if engine_process is None and chosen:
        engine_process = chosen == "on"
    if engine_process is not None:
        config = replace(config, engine_process=engine_process)
    running = await start_grpc(config, Metrics(config.metrics_adapter_labels))
    try:
        store, engine = await load_engine(config, log=lambda _message: None)
        await attach_engine(running, store, engine)
    except BaseException:        # a failed or timed-out start leaves no server (nor engine process)
        await asyncio.shield(drain_and_stop(running, 0.5, log=lambda _message: None))
        raise
    return running


@contextlib.contextmanager
def served_http(settings: dict[str, str]) -> Iterator[Any]:
    """A full server (start_full_server) with its OpenAI HTTP API, both on free loopback ports
    (metrics too); `settings`: load_server_config's keys, as strings. Yields the running server
    (`.port`, `.http_port`); drained and stopped on exit, also when the test fails."""
    from loraplex.server.app import drain_and_stop, start_http_api
    from loraplex.server.config import load_server_config

    config = load_server_config({"port": "0", "metrics_port": str(free_port()), **settings}, {})
    loop = LoopThread()
    try:
        running = loop.run(start_full_server(config))
        try:
            loop.run(start_http_api(running, config, port=0))
            yield running
        finally:
            loop.run(drain_and_stop(running, 1.0, log=lambda _m: None))
    finally:
        loop.close()


def make_peft_adapter(base_dir, out_dir, seed: int, rank: int = 4, targets=("q_proj", "v_proj")):
    """A random (non-zero B) PEFT LoRA for the model in base_dir, saved as safetensors."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(out_dir)
    return out_dir


def upload_requests(adapter_dir, adapter_id: str, private: bool = False, chunk_bytes: int = 2**20):
    """The UploadAdapter message stream for a PEFT directory: metadata, then <= 1 MiB chunks."""
    import hashlib
    from pathlib import Path

    from loraplex.v1 import adapters_pb2 as pb

    config = (Path(adapter_dir) / "adapter_config.json").read_bytes()
    weights = (Path(adapter_dir) / "adapter_model.safetensors").read_bytes()
    yield pb.UploadAdapterRequest(metadata=pb.UploadMetadata(
        adapter_id=adapter_id, config_size=len(config), config_sha256=hashlib.sha256(config).hexdigest(),
        weights_size=len(weights), weights_sha256=hashlib.sha256(weights).hexdigest(), private=private))
    for kind, data in ((pb.ADAPTER_FILE_CONFIG, config), (pb.ADAPTER_FILE_WEIGHTS, weights)):
        for start in range(0, len(data), chunk_bytes):
            yield pb.UploadAdapterRequest(chunk=pb.UploadChunk(file=kind, data=data[start:start + chunk_bytes]))


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """GET /metrics and parse it with prometheus_client's parser: {(name, sorted labels): value}."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def free_port() -> int:
    """A currently free loopback TCP port (for the metrics endpoint; 0 there means 'off')."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def self_signed_cert(directory, common_name: str, subject_alt_name: str):
    """(cert.pem, key.pem) paths of a fresh self-signed certificate, made with the openssl CLI."""
    import shutil
    import subprocess

    import pytest

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl CLI to make a self-signed certificate")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", f"/CN={common_name}",
                    "-addext", f"subjectAltName={subject_alt_name}"], check=True, capture_output=True)
    return cert, key


def wait_for_line(process, pattern, lines: list[str], timeout_s: float):
    """Read a subprocess's output (stdout, stderr merged, text mode) into `lines` on a daemon
    thread (which drains it to the end, so the pipe never fills) and return the first line's match
    of `pattern`. None if the output ended or `timeout_s` passed first, also while the process
    writes nothing at all (the wait never hangs on a read)."""
    import queue

    found: queue.Queue = queue.Queue()

    def read() -> None:
        matched = False
        for raw in process.stdout:
            lines.append(raw.rstrip())
            match = None if matched else pattern.match(raw.strip())
            if match:
                matched = True
                found.put(match)
        found.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        return found.get(timeout=timeout_s)
    except queue.Empty:
        return None
