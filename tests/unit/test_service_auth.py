"""Auth interceptor and server wiring on a real gRPC server (no model attached yet).

Without an engine the generation service answers UNAVAILABLE ("model is still loading"), so a
call that gets UNAVAILABLE has passed auth, while UNAUTHENTICATED / PERMISSION_DENIED come
from the interceptor.
"""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from grpc_harness import LoopThread, bearer
from loraplex.server.app import drain_and_stop, start_grpc
from loraplex.server.config import load_server_config
from loraplex.server.service.auth import KeyRing, Role
from loraplex.server.config import ApiKey
from loraplex.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc

API_KEY, ADMIN_KEY = "acme:inference-key-1", "admin-key-12345"


@pytest.fixture(scope="module")
def server():
    loop = LoopThread()
    config = load_server_config({"port": "0", "metrics_port": "0", "api_keys": [API_KEY],
                                 "admin_keys": [ADMIN_KEY]}, {})
    running = loop.run(start_grpc(config))
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    yield running, channel
    channel.close()
    loop.run(drain_and_stop(running, 0.5, log=lambda _m: None))
    loop.close()


def _generate(channel, metadata=None):
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    request = generation_pb2.GenerateRequest(input=generation_pb2.GenerationInput(prompt="hi"))
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(request, metadata=metadata, timeout=10)
    return error.value


def test_missing_and_wrong_keys_are_unauthenticated(server):
    _, channel = server
    assert _generate(channel).code() is grpc.StatusCode.UNAUTHENTICATED
    assert _generate(channel, bearer("not-a-key-at-all")).code() is grpc.StatusCode.UNAUTHENTICATED
    assert _generate(channel, (("authorization", "inference-key-1"),)).code() is grpc.StatusCode.UNAUTHENTICATED
    error = _generate(channel, bearer("inference-key-1"))
    assert error.code() is grpc.StatusCode.UNAVAILABLE and "loading" in error.details()


def test_inference_key_cannot_write_adapters(server):
    _, channel = server
    stub = adapters_pb2_grpc.AdapterServiceStub(channel)
    with pytest.raises(grpc.RpcError) as error:
        stub.DeleteAdapter(adapters_pb2.DeleteAdapterRequest(adapter_id="x"), metadata=bearer("inference-key-1"),
                           timeout=10)
    assert error.value.code() is grpc.StatusCode.PERMISSION_DENIED
    upload = iter([adapters_pb2.UploadAdapterRequest(metadata=adapters_pb2.UploadMetadata(adapter_id="x"))])
    with pytest.raises(grpc.RpcError) as error:
        stub.UploadAdapter(upload, metadata=bearer("inference-key-1"), timeout=10)
    assert error.value.code() is grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as error:   # admin passes auth; the store is not open yet
        stub.DeleteAdapter(adapters_pb2.DeleteAdapterRequest(adapter_id="x"), metadata=bearer(ADMIN_KEY), timeout=10)
    assert error.value.code() is grpc.StatusCode.UNAVAILABLE


def test_health_and_reflection_are_open_and_not_serving_before_load(server):
    _, channel = server
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "loraplex.v1.GenerationService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                             timeout=10))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"loraplex.v1.GenerationService", "loraplex.v1.AdapterService", "loraplex.v1.ServerService"} <= names


def test_keyring_roles_and_tenants():
    ring = KeyRing([ApiKey("inference-1", "acme")], [ApiKey("admin-123", None)])
    assert ring.authenticate(bearer("inference-1")).role is Role.INFERENCE
    assert ring.authenticate(bearer("inference-1")).tenant == "acme"
    assert ring.authenticate((("Authorization", b"bearer admin-123"),)).role is Role.ADMIN
    assert ring.authenticate(bearer("admin-1234")) is None
    assert ring.authenticate(()) is None
    assert "admin-123" not in repr(ring)
    assert KeyRing([], []).authenticate(()).role is Role.ADMIN     # auth off: everyone may do everything
