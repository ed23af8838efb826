"""TLS: with --tls-cert/--tls-key the server speaks only TLS (self-signed cert made with openssl)."""

from __future__ import annotations


import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from grpc_harness import LoopThread, bearer, self_signed_cert
from loraplex.server.app import drain_and_stop, start_grpc
from loraplex.server.config import load_server_config
from loraplex.v1 import generation_pb2, generation_pb2_grpc


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    cert, key = self_signed_cert(tmp_path_factory.mktemp("tls"), "localhost", "DNS:localhost,IP:127.0.0.1")
    loop = LoopThread()
    config = load_server_config({"port": "0", "metrics_port": "0", "tls_cert": str(cert), "tls_key": str(key),
                                 "api_keys": ["tls-client-key"]}, {})
    running = loop.run(start_grpc(config))
    yield running, cert.read_bytes()
    loop.run(drain_and_stop(running, 0.5, log=lambda _m: None))
    loop.close()


def test_tls_channel_works_and_carries_keys(tls_server):
    running, cert = tls_server
    credentials = grpc.ssl_channel_credentials(root_certificates=cert)
    with grpc.secure_channel(f"localhost:{running.port}", credentials) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        request = generation_pb2.GenerateRequest(input=generation_pb2.GenerationInput(prompt="hi"))
        with pytest.raises(grpc.RpcError) as error:
            stub.Generate(request, metadata=bearer("tls-client-key"), timeout=10)
        assert error.value.code() is grpc.StatusCode.UNAVAILABLE      # authenticated; model not loaded here


def test_plaintext_is_refused(tls_server):
    running, _ = tls_server
    with grpc.insecure_channel(f"localhost:{running.port}") as channel:
        with pytest.raises(grpc.RpcError) as error:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
        assert error.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
