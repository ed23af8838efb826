"""Issue 31 over a real server (tiny model, gRPC + HTTP in one process, tenant keys): the HTTP
routes enforce what the gRPC services enforce, and refuse work that scales with a request's
size before doing any of it."""

from __future__ import annotations

import time

import grpc
import httpx
import pytest

from grpc_harness import LoopThread, bearer, free_port, make_peft_adapter, start_full_server
from loraplex.server.app import drain_and_stop, start_http_api
from loraplex.server.config import load_server_config
from loraplex.v1 import adapters_pb2 as apb
from loraplex.v1 import adapters_pb2_grpc

OPERATOR, ACME_ADMIN, BETA_ADMIN, ACME_USER, BETA_USER = (
    "operator-admin-0001", "acme-admin-00001", "beta-admin-00001", "acme-user-000001", "beta-user-000001")
MAX_CHOICES = 8
MAX_CONNECTIONS = 64           # > the 40 concurrent unloads below
HEADER_TIMEOUT_S = 5.0


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    roots = tmp_path_factory.mktemp("roots")
    for seed, name in ((1, "tone"), (2, "other")):
        make_peft_adapter(tiny_llama_dir, roots / name, seed)
    loop = LoopThread()
    config = load_server_config({
        "model": str(tiny_llama_dir), "port": "0", "metrics_port": "0",
        "store": str(tmp_path_factory.mktemp("store")), "kv_cache_memory": "16MiB", "max_total_tokens": "512",
        "max_input_tokens": "256", "max_new_tokens": "16", "served_model_name": "tiny", "cpu_kernels": "torch",
        "max_request_choices": str(MAX_CHOICES), "allowed_register_roots": [str(roots)],
        "http_max_connections": str(MAX_CONNECTIONS), "http_header_timeout_s": str(HEADER_TIMEOUT_S),
        "http_body_timeout_s": str(HEADER_TIMEOUT_S),
        "api_keys": [f"acme:{ACME_USER}", f"beta:{BETA_USER}"],
        "admin_keys": [OPERATOR, f"acme:{ACME_ADMIN}", f"beta:{BETA_ADMIN}"]}, {})
    running = loop.run(start_full_server(config))
    loop.run(start_http_api(running, config, port=0))
    http = httpx.Client(base_url=f"http://127.0.0.1:{running.http_port}", timeout=60)
    reply = http.post("/v1/load_lora_adapter", headers=_auth(OPERATOR),
                      json={"lora_name": "tone", "lora_path": str(roots / "tone")})
    assert reply.status_code == 200, reply.text
    yield running, http, roots
    http.close()
    loop.run(drain_and_stop(running, 1.0, log=lambda _m: None))
    loop.close()


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_tenant_admin_cannot_push_a_version_of_a_public_adapter_over_http(server):
    """Defect 1: the tenant reached the store's ownership rule only over gRPC."""
    running, http, roots = server
    reply = http.post("/v1/load_lora_adapter", headers=_auth(ACME_ADMIN),
                      json={"lora_name": "tone", "lora_path": str(roots / "other")})
    assert reply.status_code == 403, reply.text
    assert "without a tenant" in reply.json()["error"]["message"]
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        got = adapters_pb2_grpc.AdapterServiceStub(channel).GetAdapter(
            apb.GetAdapterRequest(adapter_id="tone"), metadata=bearer(BETA_USER), timeout=30)
    finally:
        channel.close()
    assert list(got.versions) == [1]                  # team-b still resolves the operator's weights
    reply = http.post("/v1/unload_lora_adapter", headers=_auth(ACME_ADMIN), json={"lora_name": "tone"})
    assert reply.status_code == 403, reply.text


def test_prompts_times_n_is_bounded_before_any_work(server):
    """Defect 2: K prompts x n choices became K*n engine requests and tasks before any limit."""
    running, http, _ = server
    body = {"model": "tiny", "prompt": [[1]] * 6000, "n": 16, "max_tokens": 1}
    started = time.monotonic()
    reply = http.post("/v1/completions", headers=_auth(ACME_USER), json=body)
    elapsed = time.monotonic() - started
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "n" and str(MAX_CHOICES) in error["message"] and "96000" in error["message"]
    assert elapsed < 5.0, elapsed                     # refused from its shape, not after building 96000 requests
    stats = running.state.engine.stats()
    assert stats.num_waiting == 0 and stats.num_running == 0
    ok = http.post("/v1/completions", headers=_auth(ACME_USER),
                   json={"model": "tiny", "prompt": [[1, 2]] * 4, "n": 2, "max_tokens": 1})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == MAX_CHOICES, ok.text


def test_tokenize_and_detokenize_are_bounded_like_prompts(server):
    """Defect 3: a 3.9 MB /tokenize body was tokenized whole (seconds of tokenizer time), and
    /detokenize took any number of ids."""
    _, http, _ = server
    started = time.monotonic()
    reply = http.post("/tokenize", headers=_auth(ACME_USER), json={"prompt": "word " * 780_000})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "prompt", reply.text
    assert "bytes" in reply.json()["error"]["message"] and time.monotonic() - started < 5
    chat = http.post("/tokenize", headers=_auth(ACME_USER),
                     json={"messages": [{"role": "user", "content": "word " * 780_000}]})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages", chat.text
    ids = http.post("/detokenize", headers=_auth(ACME_USER), json={"tokens": [1] * 600})
    assert ids.status_code == 400 and ids.json()["error"]["param"] == "tokens", ids.text
    ok = http.post("/tokenize", headers=_auth(ACME_USER), json={"prompt": "hello"})
    assert ok.status_code == 200 and ok.json()["count"] > 0
    back = http.post("/detokenize", headers=_auth(ACME_USER), json={"tokens": ok.json()["tokens"]})
    assert back.status_code == 200 and "hello" in back.json()["prompt"]


NUM_UNLOADS = 40          # more than asyncio's default executor ever has (min(32, cpus + 4))


def test_unloads_waiting_on_leases_hold_no_worker(server):
    """Defect 4: /v1/unload_lora_adapter waited in a default-executor thread (delete(wait=True))."""
    import concurrent.futures

    running, http, roots = server
    store = running.state.store
    names = [f"busy-{i}" for i in range(NUM_UNLOADS)]
    for name in names:
        store.register_path(name, roots / "other")
        store.acquire(f"{name}@1")                       # as a running request would
    base = str(http.base_url).rstrip("/")
    pool = concurrent.futures.ThreadPoolExecutor(NUM_UNLOADS)
    unloads = [pool.submit(httpx.post, f"{base}/v1/unload_lora_adapter", headers=_auth(OPERATOR),
                           json={"lora_name": name}, timeout=120) for name in names]
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        _wait_until(lambda: all(store._registry.get(n, 1).state.name == "DELETING" for n in names))
        listed = adapters_pb2_grpc.AdapterServiceStub(channel).ListAdapters(
            apb.ListAdaptersRequest(), metadata=bearer(ACME_USER), timeout=8)
        assert "tone" in [a.adapter_id for a in listed.adapters]
        models = http.get("/v1/models", headers=_auth(ACME_USER), timeout=8)
        assert models.status_code == 200
        assert not any(future.done() for future in unloads)        # still waiting for the leases
    finally:
        channel.close()
        for name in names:
            store.release(f"{name}@1")
    assert all(future.result().status_code == 200 for future in unloads)
    pool.shutdown()


def _wait_until(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize",
                                   "/v1/load_lora_adapter", "/v1/unload_lora_adapter"])
def test_deeply_nested_json_is_a_400_not_a_500(server, route, caplog):
    """Defect 11: RecursionError was not caught (500 + traceback)."""
    _, http, _ = server
    body = "[" * 100_000 + "]" * 100_000
    with caplog.at_level("ERROR"):
        reply = http.post(route, headers={**_auth(OPERATOR), "content-type": "application/json"}, content=body)
    assert reply.status_code == 400, reply.text
    assert "not valid JSON" in reply.json()["error"]["message"]
    assert not [r for r in caplog.records if r.exc_info]


def test_client_errors_log_no_traceback_and_hide_the_root(server, caplog):
    """Defect 11: every 4xx of load/unload logged 'Exception in ASGI application'; a 403 for a
    path outside --allowed-register-root showed the absolute root."""
    _, http, roots = server
    with caplog.at_level("INFO"):
        answers = [
            http.post("/v1/load_lora_adapter", headers=_auth(OPERATOR), json={"lora_name": "x", "lora_path": "/etc"}),
            http.post("/v1/load_lora_adapter", headers=_auth(ACME_USER),
                      json={"lora_name": "x", "lora_path": str(roots / "tone")}),
            http.post("/v1/unload_lora_adapter", headers=_auth(OPERATOR), json={"lora_name": "ghost"}),
            http.post("/v1/unload_lora_adapter", headers=_auth(OPERATOR), json={"lora_name": "../x"}),
            http.post("/v1/load_lora_adapter", headers=_auth(OPERATOR), json={"lora_name": "x"}),
        ]
    assert [a.status_code for a in answers] == [403, 403, 404, 400, 400], [a.text for a in answers]
    assert str(roots) not in answers[0].text and "allowed register roots" in answers[0].text
    assert answers[3].json()["error"]["param"] == "lora_name"
    assert not [r for r in caplog.records if r.exc_info or "Exception in ASGI" in r.getMessage()]


@pytest.mark.parametrize("field, value", [("n", "2"), ("stream", "yes"), ("max_tokens", True), ("temperature", "0"),
                                          ("logprobs", "1")])
def test_parameters_are_strictly_typed(server, field, value):
    """Defect 11: pydantic coerced n: "2", stream: "yes", max_tokens: true."""
    _, http, _ = server
    reply = http.post("/v1/completions", headers=_auth(ACME_USER),
                      json={"model": "tiny", "prompt": "Hi", "max_tokens": 1, field: value})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == field, reply.text


def test_models_listing_is_one_registry_query(server, monkeypatch):
    """Defect 10: /v1/models issued 1 + N + N x V registry queries on the default executor."""
    running, http, _ = server
    registry = running.state.store._registry
    calls = []
    for name in ("all", "versions_of", "get"):
        original = getattr(registry, name)
        monkeypatch.setattr(registry, name, lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k))
    reply = http.get("/v1/models", headers=_auth(ACME_USER))
    assert reply.status_code == 200 and {"tone", "tone@1"} <= {m["id"] for m in reply.json()["data"]}
    assert calls == ["all"], calls


def _connect(port: int):
    import socket

    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    return sock


def _answer(sock) -> bytes:
    """What the server sends before closing (waits up to the socket timeout)."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def test_half_sent_requests_are_timed_out_and_connections_capped(server, caplog):
    """Defect 5: half-sent requests were kept forever; ~20k idle sockets used every descriptor."""
    running, http, _ = server
    port = running.http_port
    with caplog.at_level("WARNING", logger="loraplex.http"):
        headers_half = _connect(port)
        headers_half.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-")
        body_half = _connect(port)
        body_half.sendall(b"POST /tokenize HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + ACME_USER.encode()
                          + b"\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"pro")
        idle = [_connect(port) for _ in range(MAX_CONNECTIONS + 12)]
        refused = []
        for sock in idle[MAX_CONNECTIONS - 4:]:          # some of these are over the cap
            sock.settimeout(2.0)
            try:
                refused.append(_answer(sock))
            except TimeoutError:
                pass
        assert any(b" 503 " in answer.split(b"\r\n")[0] for answer in refused), refused
        assert b" 408 " in _answer(headers_half).split(b"\r\n")[0]
        assert b"http-body-timeout" in _answer(body_half)
        for sock in (headers_half, body_half, *idle):
            sock.close()
    lines = [r for r in caplog.records if "refusing HTTP connections" in r.getMessage()]
    assert 1 <= len(lines) <= 2 and not [r for r in caplog.records if r.exc_info]
    _wait_until(lambda: http.get("/health").status_code == 200)       # serving again once they are gone
    ok = http.post("/tokenize", headers=_auth(ACME_USER), json={"prompt": "hello"})
    assert ok.status_code == 200
