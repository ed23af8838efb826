"""Auth with the real engine and store: roles, tenant-private adapters, and isolation."""

from __future__ import annotations

import grpc
import pytest

from grpc_harness import LoopThread, bearer, make_peft_adapter, start_full_server, upload_requests
from loraplex.server.app import drain_and_stop
from loraplex.server.config import load_server_config
from loraplex.v1 import adapters_pb2, adapters_pb2_grpc
from loraplex.v1 import generation_pb2 as gen
from loraplex.v1 import generation_pb2_grpc

ACME_ADMIN, ACME_USER, GLOBEX_USER = "admin-acme-key", "infer-acme-key", "infer-globex-key"


@pytest.fixture(scope="module")
def channel(tiny_llama_dir, tmp_path_factory):
    loop = LoopThread()
    environ = {"LORAPLEX_API_KEYS": f"acme:{ACME_USER},globex:{GLOBEX_USER}",
               "LORAPLEX_ADMIN_KEYS": f"acme:{ACME_ADMIN}"}
    config = load_server_config({"model": str(tiny_llama_dir), "port": "0", "metrics_port": "0",
                                 "store": str(tmp_path_factory.mktemp("store")), "kv_cache_memory": "16MiB",
                                 "max_total_tokens": "512", "max_input_tokens": "256"}, environ)
    running = loop.run(start_full_server(config))
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    adapter_dir = make_peft_adapter(tiny_llama_dir, tmp_path_factory.mktemp("secret"), seed=5)
    adapters_pb2_grpc.AdapterServiceStub(channel).UploadAdapter(
        upload_requests(adapter_dir, "secret", private=True), metadata=bearer(ACME_ADMIN), timeout=60)
    yield channel, adapter_dir
    channel.close()
    loop.run(drain_and_stop(running, 1.0, log=lambda _m: None))
    loop.close()


def _generate(channel, key, adapter=""):
    request = gen.GenerateRequest(input=gen.GenerationInput(prompt="Hi", adapter_id=adapter,
                                                            sampling=gen.SamplingParams(max_new_tokens=3)))
    return generation_pb2_grpc.GenerationServiceStub(channel).Generate(request, metadata=bearer(key), timeout=60)


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value.code()


def test_missing_or_wrong_key_is_rejected(channel):
    channel, _ = channel
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    request = gen.GenerateRequest(input=gen.GenerationInput(prompt="Hi"))
    assert _code(lambda: stub.Generate(request, timeout=10)) is grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: stub.Generate(request, metadata=bearer("wrong-key-123"), timeout=10)) is \
        grpc.StatusCode.UNAUTHENTICATED
    assert _generate(channel, GLOBEX_USER).usage.generated_tokens >= 1


def test_inference_key_cannot_upload_or_delete(channel):
    channel, adapter_dir = channel
    stub = adapters_pb2_grpc.AdapterServiceStub(channel)
    assert _code(lambda: stub.UploadAdapter(upload_requests(adapter_dir, "mine"), metadata=bearer(ACME_USER),
                                            timeout=30)) is grpc.StatusCode.PERMISSION_DENIED
    assert _code(lambda: stub.DeleteAdapter(adapters_pb2.DeleteAdapterRequest(adapter_id="secret"),
                                            metadata=bearer(ACME_USER), timeout=30)) is grpc.StatusCode.PERMISSION_DENIED


def test_private_adapter_is_visible_to_its_tenant_only(channel):
    channel, _ = channel
    stub = adapters_pb2_grpc.AdapterServiceStub(channel)
    got = stub.GetAdapter(adapters_pb2.GetAdapterRequest(adapter_id="secret"), metadata=bearer(ACME_USER), timeout=10)
    assert got.adapter.owner == "acme"
    assert _generate(channel, ACME_USER, "secret").adapter_id == "secret@1"
    assert _code(lambda: stub.GetAdapter(adapters_pb2.GetAdapterRequest(adapter_id="secret"),
                                         metadata=bearer(GLOBEX_USER), timeout=10)) is grpc.StatusCode.NOT_FOUND
    assert _code(lambda: _generate(channel, GLOBEX_USER, "secret")) is grpc.StatusCode.NOT_FOUND
    listed = stub.ListAdapters(adapters_pb2.ListAdaptersRequest(), metadata=bearer(GLOBEX_USER), timeout=10)
    assert "secret" not in {a.adapter_id for a in listed.adapters}
