"""Security through gRPC on a real server (tiny model, auth on): the malicious-adapter corpus
uploaded over UploadAdapter, traversal ids through every RPC that takes an id, register-path
escapes, oversize messages, tenant isolation; API keys never in logs or error messages, and
error messages never name server paths."""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from grpc_harness import LoopThread, rich_details, start_full_server
from grpc_harness import bearer as _bearer
from loraplex.server.app import drain_and_stop
from loraplex.server.config import load_server_config
from loraplex.v1 import adapters_pb2 as apb
from loraplex.v1 import adapters_pb2_grpc, generation_pb2_grpc
from loraplex.v1 import generation_pb2 as gen

# The store unit tests' corpus (tests/unit/store has no package; its helpers are plain modules).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "store"))
from store_adapters import adapter_bytes, write_adapter  # noqa: E402
from test_store_bad_adapters import UPLOAD_CASES  # noqa: E402

ADMIN = "acme:admin-9f3c1e7d5b2a4c6e8f0a1b3d"
USER_A = "acme:user-a-7e1d3c5b9a2f4e6d8c0b"
USER_B = "globex:user-b-1a3c5e7f9b2d4f6a8c0e"
GUESSED = "acme:guess-0000111122223333444455"
KEYS = (ADMIN, USER_A, USER_B, GUESSED)
TRAVERSAL = ["../x", "../../etc/passwd", "/etc/passwd", "a/../../b", "a..b", ".hidden", "x" * 129, "a b",
             "..", "a\\..\\b", "nul\x00"]


def bearer(key: str):
    """Clients send the secret part of a 'tenant:secret' key."""
    return _bearer(key.split(":", 1)[1])


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record) + (logging.Formatter().formatException(record.exc_info)
                                                 if record.exc_info else ""))


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    records, logger = Records(), logging.getLogger()
    old_level = logger.level
    logger.addHandler(records)
    logger.setLevel(logging.DEBUG)
    loop = LoopThread()
    store, roots = tmp_path_factory.mktemp("store"), tmp_path_factory.mktemp("adapters")
    config = load_server_config({
        "model": str(tiny_llama_dir), "port": "0", "metrics_port": "0", "store": str(store),
        "kv_cache_memory": "16MiB", "max_total_tokens": "512", "max_input_tokens": "256",
        "max_new_tokens": "16", "max_lora_rank": "16", "max_message_bytes": "2MiB",
        "api_keys": [USER_A, USER_B], "admin_keys": [ADMIN], "allowed_register_roots": [str(roots)]}, {})
    running = loop.run(start_full_server(config))
    assert running.state.keys.enabled
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    yield running, channel, records, (store, roots, Path(tiny_llama_dir))
    channel.close()
    loop.run(drain_and_stop(running, 1.0, log=lambda _m: None))
    loop.close()
    logger.removeHandler(records)
    logger.setLevel(old_level)


def _error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        result = call()
        if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
            list(result)
    return caught.value


def _no_secrets(error: grpc.RpcError, paths) -> None:
    text = f"{error.details()} {rich_details(error)}"
    for key in KEYS:
        assert key.split(":")[1] not in text
    for path in paths:
        assert str(path) not in text, f"error names a server path: {text}"


def _upload(config: bytes, weights: bytes, name: str):
    yield apb.UploadAdapterRequest(metadata=apb.UploadMetadata(
        adapter_id=name, config_size=len(config), config_sha256=hashlib.sha256(config).hexdigest(),
        weights_size=len(weights), weights_sha256=hashlib.sha256(weights).hexdigest()))
    for kind, data in ((apb.ADAPTER_FILE_CONFIG, config), (apb.ADAPTER_FILE_WEIGHTS, weights)):
        for start in range(0, len(data), 2**20):
            yield apb.UploadAdapterRequest(chunk=apb.UploadChunk(file=kind, data=data[start:start + 2**20]))


def _names(channel, key=ADMIN) -> list[str]:
    reply = adapters_pb2_grpc.AdapterServiceStub(channel).ListAdapters(apb.ListAdaptersRequest(), timeout=10,
                                                                       metadata=bearer(key))
    return [a.adapter_id for a in reply.adapters]


def test_good_adapter_uploads(server):
    _, channel, _, _ = server
    adapters_pb2_grpc.AdapterServiceStub(channel).UploadAdapter(_upload(*adapter_bytes(seed=1), "good"),
                                                                timeout=30, metadata=bearer(ADMIN))
    assert _names(channel) == ["good"]


@pytest.mark.parametrize("case", sorted(UPLOAD_CASES))
def test_malicious_adapter_corpus_is_refused_over_grpc(server, case):
    _, channel, _, paths = server
    config, weights, rule = UPLOAD_CASES[case]()
    stub = adapters_pb2_grpc.AdapterServiceStub(channel)
    error = _error(lambda: stub.UploadAdapter(_upload(config, weights, f"bad-{case}"), timeout=30,
                                              metadata=bearer(ADMIN)))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, (case, error.details())
    assert rule in error.details() or rule in str(rich_details(error)), (rule, error.details())
    _no_secrets(error, paths)
    assert not [n for n in _names(channel) if n.startswith("bad-")]
    assert not [p for p in (paths[0] / "tmp").glob("*") if p.is_dir()], "staging left behind"


@pytest.mark.parametrize("bad_id", TRAVERSAL)
def test_traversal_ids_refused_by_every_rpc(server, bad_id):
    _, channel, _, paths = server
    adapters = adapters_pb2_grpc.AdapterServiceStub(channel)
    generation = generation_pb2_grpc.GenerationServiceStub(channel)
    source = write_adapter(paths[1] / "ok", seed=2)
    inp = gen.GenerationInput(prompt="hi", adapter_id=bad_id, sampling=gen.SamplingParams(max_new_tokens=2))
    calls = {
        "Generate": lambda: generation.Generate(gen.GenerateRequest(input=inp), timeout=10, metadata=bearer(USER_A)),
        "GenerateStream": lambda: generation.GenerateStream(gen.GenerateStreamRequest(input=inp), timeout=10,
                                                            metadata=bearer(USER_A)),
        "UploadAdapter": lambda: adapters.UploadAdapter(_upload(*adapter_bytes(seed=3), bad_id), timeout=10,
                                                        metadata=bearer(ADMIN)),
        "RegisterAdapter": lambda: adapters.RegisterAdapter(apb.RegisterAdapterRequest(
            adapter_id=bad_id, path=str(source)), timeout=10, metadata=bearer(ADMIN)),
        "GetAdapter": lambda: adapters.GetAdapter(apb.GetAdapterRequest(adapter_id=bad_id), timeout=10,
                                                  metadata=bearer(USER_A)),
        "DeleteAdapter": lambda: adapters.DeleteAdapter(apb.DeleteAdapterRequest(adapter_id=bad_id), timeout=10,
                                                        metadata=bearer(ADMIN)),
    }
    for method, call in calls.items():
        error = _error(call)
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, (method, bad_id, error.details())
        _no_secrets(error, paths)
    assert set(_names(channel)) <= {"good", "reg"}


@pytest.mark.parametrize("path", ["/etc", "../../..", "/", "{store}", "{model}", "{roots}/../outside"])
def test_register_path_escapes_are_refused_without_leaking_paths(server, path):
    _, channel, _, (store, roots, model) = server
    (roots.parent / "outside").mkdir(exist_ok=True)
    write_adapter(roots.parent / "outside", seed=4)
    target = path.format(store=store, model=model, roots=roots)
    error = _error(lambda: adapters_pb2_grpc.AdapterServiceStub(channel).RegisterAdapter(
        apb.RegisterAdapterRequest(adapter_id="escape", path=target), timeout=10, metadata=bearer(ADMIN)))
    assert error.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT), error.details()
    _no_secrets(error, [p for p in (store, model) if str(p) not in target])   # echoing the caller's input is fine
    assert "escape" not in _names(channel)


def test_oversize_messages_are_refused_and_server_keeps_serving(server):
    _, channel, _, paths = server
    generation = generation_pb2_grpc.GenerationServiceStub(channel)
    huge = gen.GenerateRequest(input=gen.GenerationInput(prompt="x" * (3 * 2**20)))
    error = _error(lambda: generation.Generate(huge, timeout=20, metadata=bearer(USER_A)))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    config, weights = adapter_bytes(seed=5)
    big_chunk = [next(_upload(config, weights, "chunky")),
                 apb.UploadAdapterRequest(chunk=apb.UploadChunk(file=apb.ADAPTER_FILE_WEIGHTS,
                                                                data=b"\0" * (2**20 + 1)))]
    error = _error(lambda: adapters_pb2_grpc.AdapterServiceStub(channel).UploadAdapter(
        iter(big_chunk), timeout=20, metadata=bearer(ADMIN)))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    _no_secrets(error, paths)
    long_prompt = gen.GenerateRequest(input=gen.GenerationInput(prompt="word " * 5000))
    error = _error(lambda: generation.Generate(long_prompt, timeout=20, metadata=bearer(USER_A)))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_private_adapters_are_invisible_to_other_tenants(server):
    _, channel, _, _ = server
    config, weights = adapter_bytes(seed=6)
    messages = list(_upload(config, weights, "acme-secret"))
    messages[0].metadata.private = True
    adapters_pb2_grpc.AdapterServiceStub(channel).UploadAdapter(iter(messages), timeout=30, metadata=bearer(ADMIN))
    assert "acme-secret" in _names(channel, USER_A) and "acme-secret" not in _names(channel, USER_B)
    inp = gen.GenerationInput(prompt="hi", adapter_id="acme-secret", sampling=gen.SamplingParams(max_new_tokens=2))
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    assert len(stub.Generate(gen.GenerateRequest(input=inp), timeout=20, metadata=bearer(USER_A)).token_ids) == 2
    error = _error(lambda: stub.Generate(gen.GenerateRequest(input=inp), timeout=20, metadata=bearer(USER_B)))
    assert error.code() is grpc.StatusCode.NOT_FOUND
    error = _error(lambda: stub.Generate(gen.GenerateRequest(input=inp), timeout=20, metadata=bearer(GUESSED)))
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    _no_secrets(error, ())
    error = _error(lambda: adapters_pb2_grpc.AdapterServiceStub(channel).DeleteAdapter(
        apb.DeleteAdapterRequest(adapter_id="acme-secret"), timeout=10, metadata=bearer(USER_A)))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED


def test_zz_no_key_ever_reaches_the_logs(server):
    """Runs last in this module: every log line of the whole module, tracebacks included."""
    _, _, records, _ = server
    assert records.lines, "the log capture saw nothing; the check would be vacuous"
    text = "\n".join(records.lines)
    for key in KEYS:
        assert key.split(":")[1] not in text, "an API key reached the server log"
