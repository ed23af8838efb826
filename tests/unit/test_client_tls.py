"""TLS and auth of Client/AsyncClient against the real loraplex gRPC server (no model loaded:
health NOT_SERVING, authenticated generation answers UNAVAILABLE while the model loads)."""

from __future__ import annotations

import asyncio

import pytest

from grpc_harness import LoopThread, self_signed_cert
from loraplex.client import (AsyncClient, AuthenticationError, Client, HealthStatus, RetryPolicy,
                             ServerUnavailableError)
from loraplex.server.app import drain_and_stop, start_grpc
from loraplex.server.config import load_server_config

KEY = "tls-client-key"
NO_RETRY = RetryPolicy(max_attempts=1)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    cert, key = self_signed_cert(tmp_path_factory.mktemp("tls"), "loraplex.test", "DNS:loraplex.test")
    loop = LoopThread()
    config = load_server_config({"port": "0", "metrics_port": "0", "tls_cert": str(cert), "tls_key": str(key),
                                 "api_keys": [KEY]}, {})
    running = loop.run(start_grpc(config))
    yield f"127.0.0.1:{running.port}", cert
    loop.run(drain_and_stop(running, 0.5, log=lambda _m: None))
    loop.close()


def test_tls_with_pinned_root_and_server_name(tls_server):
    address, cert = tls_server
    with Client(address, root_certificates=cert, tls_server_name="loraplex.test", retry=NO_RETRY) as client:
        assert client.health(timeout=10) is HealthStatus.NOT_SERVING
        with pytest.raises(AuthenticationError, match="Bearer"):
            client.generate("hi", timeout=10)
    with Client(address, api_key=KEY, root_certificates=cert, tls_server_name="loraplex.test",
                retry=NO_RETRY) as client, pytest.raises(ServerUnavailableError) as raised:
        client.generate("hi", timeout=10)
    assert not raised.value.unreachable          # the server answered: authenticated, model not loaded yet


def test_plaintext_client_cannot_talk_to_a_tls_server(tls_server):
    address, _ = tls_server
    with Client(address, retry=NO_RETRY) as client, pytest.raises(ServerUnavailableError):
        client.health(timeout=5)


def test_async_client_over_tls(tls_server):
    address, cert = tls_server

    async def scenario():
        async with AsyncClient(address, root_certificates=cert.read_bytes(), tls_server_name="loraplex.test",
                               retry=NO_RETRY) as client:
            status = await client.health(timeout=10)
            with pytest.raises(AuthenticationError):
                await client.list_adapters(timeout=10)
            return status

    assert asyncio.run(scenario()) is HealthStatus.NOT_SERVING
