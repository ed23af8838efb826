"""Issue 16 over real gRPC (tiny model, auth with tenants, metrics on): private adapters never named
on /metrics and unknown ids never take a label; ids ending in a newline refused; the tenant rule
for taken and public ids; deletes waiting on leases hold no worker thread; undecodable upload
messages get UNKNOWN; a huge prompt is refused by its byte size, a long one on a tokenized prefix;
the tokenizer thread runs at a lower priority."""

from __future__ import annotations

import logging

import grpc
import pytest

from grpc_harness import LoopThread, bearer, free_port, make_peft_adapter, scrape, start_full_server, upload_requests
from loraplex.server.app import drain_and_stop
from loraplex.server.config import load_server_config
from loraplex.v1 import adapters_pb2 as apb
from loraplex.v1 import adapters_pb2_grpc, generation_pb2_grpc
from loraplex.v1 import generation_pb2 as gen

OPERATOR, ACME_ADMIN, GLOBEX_ADMIN, ACME_USER = ("operator-admin-0001", "acme-admin-0001", "globex-admin-0001",
                                                 "acme-user-00001")
NUM_DELETES = 40          # more than asyncio's default executor ever has (min(32, cpus + 4))
C = grpc.StatusCode


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    loop = LoopThread()
    roots = tmp_path_factory.mktemp("roots")
    metrics_port = free_port()
    config = load_server_config({
        "model": str(tiny_llama_dir), "port": "0", "metrics_port": str(metrics_port), "metrics_host": "127.0.0.1",
        "store": str(tmp_path_factory.mktemp("store")), "kv_cache_memory": "16MiB", "max_total_tokens": "512",
        "max_input_tokens": "256", "max_new_tokens": "8", "max_message_bytes": "8MiB",
        "api_keys": [f"acme:{ACME_USER}"], "allowed_register_roots": [str(roots)],
        "admin_keys": [OPERATOR, f"acme:{ACME_ADMIN}", f"globex:{GLOBEX_ADMIN}"]}, {})
    running = loop.run(start_full_server(config))
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    adapter_dir = make_peft_adapter(tiny_llama_dir, roots / "tone", seed=4)
    stub = adapters_pb2_grpc.AdapterServiceStub(channel)
    stub.UploadAdapter(upload_requests(adapter_dir, "open-tone"), metadata=bearer(OPERATOR), timeout=60)
    stub.UploadAdapter(upload_requests(adapter_dir, "secret-tone", private=True), metadata=bearer(ACME_ADMIN),
                       timeout=60)
    yield running, channel, adapter_dir, metrics_port
    channel.close()
    loop.run(drain_and_stop(running, 1.0, log=lambda _m: None))
    loop.close()


def _code(call) -> tuple[grpc.StatusCode, str]:
    try:
        call()
        return C.OK, ""
    except grpc.RpcError as error:
        return error.code(), error.details() or ""


def _generate(channel, key: str, adapter: str = "", prompt: str = "Hi"):
    request = gen.GenerateRequest(input=gen.GenerationInput(prompt=prompt, adapter_id=adapter, sampling=gen.SamplingParams(
        max_new_tokens=2, ignore_eos=True)))
    return generation_pb2_grpc.GenerationServiceStub(channel).Generate(request, metadata=bearer(key), timeout=60)


def test_metrics_never_name_private_adapters_nor_unknown_ids(server):
    running, channel, _, metrics_port = server
    assert running.metrics_http.server_address[0] == "127.0.0.1"          # --metrics-host
    _generate(channel, ACME_USER, "open-tone")
    _generate(channel, ACME_USER, "secret-tone")
    for ghost in ("ghost-one", "ghost-two@3"):
        assert _code(lambda: _generate(channel, ACME_USER, ghost))[0] is C.NOT_FOUND
    labels = {dict(labels).get("adapter") for (name, labels), _ in scrape(metrics_port).items()
              if name == "loraplex_requests_total"}
    assert {"open-tone", "private", "other"} <= labels, labels
    assert not labels & {"secret-tone", "ghost-one", "ghost-two"}, labels


def test_ids_ending_in_a_newline_are_refused(server):
    _, channel, adapter_dir, _ = server
    stub = adapters_pb2_grpc.AdapterServiceStub(channel)
    code, _ = _code(lambda: stub.UploadAdapter(upload_requests(adapter_dir, "open-tone\n"), metadata=bearer(OPERATOR),
                                               timeout=60))
    assert code is C.INVALID_ARGUMENT
    assert _code(lambda: _generate(channel, ACME_USER, "open-tone\n"))[0] is C.INVALID_ARGUMENT
    assert _code(lambda: stub.GetAdapter(apb.GetAdapterRequest(adapter_id="open-tone@1\n"),
                                         metadata=bearer(ACME_USER), timeout=30))[0] is C.INVALID_ARGUMENT


def test_tenant_rule_for_taken_and_public_ids(server):
    _, channel, adapter_dir, _ = server
    stub = adapters_pb2_grpc.AdapterServiceStub(channel)
    private_taken = _code(lambda: stub.UploadAdapter(upload_requests(adapter_dir, "secret-tone", private=True),
                                                     metadata=bearer(GLOBEX_ADMIN), timeout=60))
    public_taken = _code(lambda: stub.UploadAdapter(upload_requests(adapter_dir, "open-tone", private=True),
                                                    metadata=bearer(GLOBEX_ADMIN), timeout=60))
    assert private_taken[0] is public_taken[0] is C.ALREADY_EXISTS
    assert private_taken[1].replace("secret-tone", "X") == public_taken[1].replace("open-tone", "X")
    for admin in (ACME_ADMIN, GLOBEX_ADMIN):
        code, message = _code(lambda: stub.UploadAdapter(upload_requests(adapter_dir, "open-tone"),
                                                         metadata=bearer(admin), timeout=60))
        assert code is C.PERMISSION_DENIED and "without a tenant" in message
        assert _code(lambda: stub.DeleteAdapter(apb.DeleteAdapterRequest(adapter_id="open-tone"),
                                                metadata=bearer(admin), timeout=30))[0] is C.PERMISSION_DENIED
    reply = stub.GetAdapter(apb.GetAdapterRequest(adapter_id="open-tone"), metadata=bearer(ACME_USER), timeout=30)
    assert list(reply.versions) == [1]


def test_deletes_waiting_on_leases_do_not_starve_other_rpcs(server):
    running, channel, adapter_dir, _ = server
    store = running.state.store
    names = [f"busy-{i}" for i in range(NUM_DELETES)]
    for name in names:
        store.register_path(name, adapter_dir)
        store.acquire(f"{name}@1")                      # as a running request would
    stub = adapters_pb2_grpc.AdapterServiceStub(channel)
    deletes = [stub.DeleteAdapter.future(apb.DeleteAdapterRequest(adapter_id=name), metadata=bearer(OPERATOR),
                                         timeout=120) for name in names]
    try:
        listed = stub.ListAdapters(apb.ListAdaptersRequest(), metadata=bearer(ACME_USER), timeout=20)
        assert "open-tone" in [a.adapter_id for a in listed.adapters]
        assert not any(future.done() for future in deletes)       # still waiting for the leases
    finally:
        for name in names:
            store.release(f"{name}@1")
    assert [list(future.result().deleted_versions) for future in deletes] == [[1]] * NUM_DELETES


def test_undecodable_upload_messages_get_unknown(server, caplog):
    _, channel, _, _ = server
    call = channel.stream_unary("/loraplex.v1.AdapterService/UploadAdapter", request_serializer=lambda b: b,
                                response_deserializer=lambda b: b)
    with caplog.at_level(logging.ERROR):
        for messages in ([b"\x0a\x04\xff\xfe\xc3\x28"], [b"\xff\xff\xff"]):
            code, _ = _code(lambda: call(iter(messages), metadata=bearer(OPERATOR), timeout=30))
            assert code is C.UNKNOWN, messages
    assert not [r for r in caplog.records if "internal error" in r.getMessage()]


def test_huge_prompt_is_refused_by_its_size(server):
    _, channel, _, _ = server
    code, message = _code(lambda: _generate(channel, ACME_USER, prompt="word " * 800_000))
    assert code is C.INVALID_ARGUMENT and "bytes" in message


def test_long_prompt_is_refused_on_a_prefix(server):
    """Within the byte bound, far over max_input_tokens: refused after tokenizing a prefix
    (long_prompt.py), naming the prompt and a lower bound on its tokens."""
    _, channel, _, _ = server
    code, message = _code(lambda: _generate(channel, ACME_USER, prompt="word " * 3000))
    assert code is C.INVALID_ARGUMENT and "has at least" in message and "the limit is 256" in message


def test_the_tokenizer_thread_runs_below_the_process_priority(server):
    """The front end's tokenizer thread (both EngineClients: tokenizer_pool.py) has nice +10;
    the threads that serve and step keep the process's."""
    import os
    import threading

    from loraplex.server.engine.tokenizer_pool import TOKENIZER_NICE

    _, channel, _, _ = server
    _generate(channel, ACME_USER, prompt="Hello there")        # the pool's thread starts on first use

    def nice(tid: int) -> int:
        with open(f"/proc/self/task/{tid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[16])

    base = nice(os.getpid())
    tokenizers = [t for t in threading.enumerate() if t.name.startswith("loraplex-tokenize")]
    assert tokenizers and all(nice(t.native_id) == min(19, base + TOKENIZER_NICE) for t in tokenizers)
    others = [t for t in threading.enumerate() if not t.name.startswith("loraplex-tokenize")]
    assert all(nice(t.native_id) == base for t in others if t.native_id is not None)


def test_server_still_serving(server):
    _, channel, _, _ = server
    assert _generate(channel, ACME_USER, "open-tone").adapter_id == "open-tone@1"
