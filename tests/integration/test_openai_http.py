"""The OpenAI-compatible HTTP API on a real server (tiny model; gRPC and HTTP in one process, one
engine), driven by the real `openai` package (sync and async) and plain httpx for SSE framing."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import httpx
import openai
import pytest

from grpc_harness import LoopThread, bearer, free_port, make_peft_adapter, scrape, self_signed_cert, start_full_server
from loraplex.server.app import drain_and_stop, start_http_api
from loraplex.server.config import load_server_config
from loraplex.v1 import generation_pb2 as gen
from loraplex.v1 import generation_pb2_grpc

ACME, BETA, ADMIN, ACME_ADMIN = "acme-key-0001", "beta-key-0001", "admin-key-0001", "acme-admin-0001"
BASE = "tiny"
PROMPT = "The quick brown fox jumps over"


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    roots = tmp_path_factory.mktemp("register-root")
    for seed, name in ((1, "tone"), (2, "legal"), (3, "secret"), (4, "temp")):
        make_peft_adapter(tiny_llama_dir, roots / name, seed)
    loop = LoopThread()
    config = load_server_config({
        "model": str(tiny_llama_dir), "port": "0", "metrics_port": str(free_port()),
        "store": str(tmp_path_factory.mktemp("store")), "kv_cache_memory": "32MiB", "max_num_seqs": "4",
        "max_queued_requests": "6", "max_total_tokens": "1024", "max_input_tokens": "512",
        "max_new_tokens": "400", "max_loras": "2", "served_model_name": BASE, "cpu_kernels": "torch",
        "allowed_register_roots": [str(roots)],
        "api_keys": [f"acme:{ACME}", f"beta:{BETA}"], "admin_keys": [ADMIN, f"acme:{ACME_ADMIN}"]}, {})
    running = loop.run(start_full_server(config))
    loop.run(start_http_api(running, config, port=0))
    admin = httpx.Client(base_url=f"http://127.0.0.1:{running.http_port}", timeout=60,
                         headers={"Authorization": f"Bearer {ADMIN}"})
    for name in ("tone", "legal"):
        reply = admin.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(roots / name)})
        assert reply.status_code == 200, reply.text
    reply = httpx.post(f"http://127.0.0.1:{running.http_port}/v1/load_lora_adapter", timeout=60,
                       headers={"Authorization": f"Bearer {ACME_ADMIN}"},
                       json={"lora_name": "secret", "lora_path": str(roots / "secret"), "private": True})
    assert reply.status_code == 200, reply.text
    yield running, config, roots, loop
    admin.close()
    loop.run(drain_and_stop(running, 1.0, log=lambda _m: None))
    loop.close()


def _url(server) -> str:
    return f"http://127.0.0.1:{server[0].http_port}/v1"


def _client(server, key=ACME) -> openai.OpenAI:
    return openai.OpenAI(base_url=_url(server), api_key=key, max_retries=0, timeout=120)


def _wait_idle(running, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = running.state.engine.stats()
        if stats.num_running == 0 and stats.num_waiting == 0 and stats.num_free_blocks == stats.num_total_blocks:
            return time.monotonic()
        time.sleep(0.005)
    raise AssertionError(f"engine not idle: {running.state.engine.stats()}")


GREEDY = dict(temperature=0, max_tokens=8, extra_body={"ignore_eos": True})


def test_models_list_hides_other_tenants_private_adapters(server):
    acme = {m.id for m in _client(server).models.list()}
    beta = {m.id for m in _client(server, BETA).models.list()}
    assert {BASE, "tone", "tone@1", "legal", "legal@1", "secret", "secret@1"} <= acme
    assert {BASE, "tone", "legal@1"} <= beta and not {"secret", "secret@1"} & beta
    with pytest.raises(openai.NotFoundError):
        _client(server, BETA).completions.create(model="secret", prompt=PROMPT, **GREEDY)
    assert _client(server).models.retrieve("tone@1").id == "tone@1"


def test_completions_stream_and_not_agree(server):
    client = _client(server)
    whole = client.completions.create(model="tone", prompt=PROMPT, **GREEDY)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 8 and whole.usage.prompt_tokens > 0
    chunks = list(client.completions.create(model="tone", prompt=PROMPT, stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    base = client.completions.create(model=BASE, prompt=PROMPT, **GREEDY)
    assert base.choices[0].text != whole.choices[0].text          # the adapter changes the output


def test_async_chat_stream_with_usage(server):
    async def run():
        async with openai.AsyncOpenAI(base_url=_url(server), api_key=ACME, max_retries=0, timeout=120) as client:
            whole = await client.chat.completions.create(
                model="legal@1", messages=[{"role": "user", "content": "Hello there"}], **GREEDY)
            stream = await client.chat.completions.create(
                model="legal@1", messages=[{"role": "user", "content": "Hello there"}], stream=True,
                stream_options={"include_usage": True}, **GREEDY)
            return whole, [chunk async for chunk in stream]

    whole, chunks = asyncio.run(run())
    assert whole.choices[0].message.role == "assistant" and whole.usage.completion_tokens == 8
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_n_choices_with_logprobs_and_top_alternatives(server):
    client = _client(server)
    reply = client.completions.create(model="tone", prompt=PROMPT, n=3, temperature=1.0, seed=7, max_tokens=6,
                                      logprobs=3, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in reply.choices) == [0, 1, 2]
    assert reply.usage.completion_tokens == 18
    for choice in reply.choices:
        logprobs = choice.logprobs
        assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
        assert all(1 <= len(top) <= 3 for top in logprobs.top_logprobs)
        assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert len({c.text for c in reply.choices}) > 1                    # seeded per choice, not copies
    again = client.completions.create(model="tone", prompt=PROMPT, n=3, temperature=1.0, seed=7, max_tokens=6,
                                      extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in reply.choices]
    chat = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "Hi"}],
                                          logprobs=True, top_logprobs=2, **GREEDY)
    content = chat.choices[0].logprobs.content
    assert len(content) == 8
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)   # greedy: the top one


def test_openai_exception_classes(server):
    client = _client(server)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", prompt=PROMPT, **GREEDY)
    with pytest.raises(openai.AuthenticationError):
        _client(server, key="wrong-key-123").completions.create(model=BASE, prompt=PROMPT, **GREEDY)
    with pytest.raises(openai.PermissionDeniedError):
        client.post("/load_lora_adapter", body={"lora_name": "x", "lora_path": "/tmp"}, cast_to=httpx.Response)
    for kwargs, param in ((dict(response_format={"type": "xml"}), "response_format.type"),
                          (dict(tools=[{"type": "code_interpreter"}]), "tools.0"),
                          (dict(temperature=-1), "temperature"), (dict(max_tokens=100000), "max_tokens"),
                          (dict(extra_body={"frobnicate": 1}), "frobnicate")):
        with pytest.raises(openai.BadRequestError) as caught:
            options = {**GREEDY, **kwargs}
            client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "x"}], **options)
        assert caught.value.body["param"] == param, caught.value.body
    running = server[0]
    with pytest.raises(openai.RateLimitError) as caught:          # 16 requests > 4 running + 6 queued
        client.completions.create(model=BASE, prompt=PROMPT, n=16, temperature=0, max_tokens=300,
                                  extra_body={"ignore_eos": True})
    assert int(caught.value.response.headers["retry-after"]) >= 1
    _wait_idle(running)


def test_sse_framing_with_plain_httpx(server):
    body = {"model": BASE, "prompt": PROMPT, "stream": True, "max_tokens": 5, "temperature": 0, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{_url(server)}/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {ACME}"}) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        raw = reply.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 5
    assert all(p["usage"] is None for p in payloads[:-1])
    assert sum(len(p["choices"]) for p in payloads) >= 5


def test_client_disconnect_mid_stream_frees_the_engine(server):
    running = server[0]
    body = {"model": "tone", "prompt": PROMPT, "stream": True, "max_tokens": 390, "temperature": 0,
            "ignore_eos": True}
    with httpx.stream("POST", f"{_url(server)}/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {ACME}"}) as reply:
        lines = reply.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert running.state.engine.stats().num_running == 1
        closed = time.monotonic()
    idle = _wait_idle(running, timeout=5.0)
    assert idle - closed < 1.0, f"engine idle {idle - closed:.2f}s after the client left"


def test_http_and_grpc_greedy_tokens_agree_in_a_shared_batch(server):
    running, _config, _roots, _loop = server
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    client = _client(server)
    steps: list[int] = []
    running.state.engine.add_step_listener(lambda stats: steps.append(stats.active_adapters))

    def over_grpc(adapter: str) -> list[int]:
        request = gen.GenerateRequest(input=gen.GenerationInput(prompt=PROMPT, adapter_id=adapter, sampling=gen.SamplingParams(
            max_new_tokens=24, ignore_eos=True, seed=3)))
        return list(stub.Generate(request, timeout=120, metadata=bearer(ACME)).token_ids)

    def over_http(adapter: str) -> list[int]:
        reply = client.completions.create(model=adapter, prompt=PROMPT, temperature=0, max_tokens=24, seed=3,
                                          logprobs=0, extra_body={"ignore_eos": True,
                                                                  "return_tokens_as_token_ids": True})
        return [int(t.removeprefix("token_id:")) for t in reply.choices[0].logprobs.tokens]

    solo = {("grpc", "tone"): over_grpc("tone"), ("http", "legal"): over_http("legal"),
            ("http", "tone"): over_http("tone"), ("grpc", "legal"): over_grpc("legal")}
    assert solo[("grpc", "tone")] == solo[("http", "tone")] and solo[("grpc", "legal")] == solo[("http", "legal")]
    # Overlap by construction, not by timing: "tone" streams up to 400 tokens and is closed only
    # after "legal" (24 tokens) has finished, so legal runs while tone is still running unless
    # tone produced all 400 tokens first (a very busy machine); then the round is run again.
    for _attempt in range(3):
        steps.clear()
        stream = client.completions.create(
            model="tone", prompt=PROMPT, temperature=0, max_tokens=400, seed=3, logprobs=0, stream=True,
            extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
        chunks = iter(stream)
        tone: list[int] = []
        while not tone:                                    # tone is running
            tone += [int(t.removeprefix("token_id:")) for t in next(chunks).choices[0].logprobs.tokens]
        assert over_grpc("legal") == solo[("grpc", "legal")]
        while len(tone) < 24:
            tone += [int(t.removeprefix("token_id:")) for t in next(chunks).choices[0].logprobs.tokens]
        stream.close()
        assert tone[:24] == solo[("http", "tone")]
        if max(steps) == 2:
            break
    assert max(steps) == 2, "the HTTP and gRPC requests never ran in the same batch"
    channel.close()


def test_grpc_returns_top_logprobs_and_takes_penalties(server):
    running = server[0]
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        sampling = gen.SamplingParams(max_new_tokens=6, ignore_eos=True, top_logprobs=3)
        reply = stub.Generate(gen.GenerateRequest(input=gen.GenerationInput(prompt=PROMPT, sampling=sampling)),
                              timeout=60, metadata=bearer(ACME))
        assert len(reply.top_logprobs) == len(reply.token_ids) == len(reply.logprobs) == 6
        for token, logprob, top in zip(reply.token_ids, reply.logprobs, reply.top_logprobs):
            assert len(top.alternatives) == 3 and top.alternatives[0].token_id == token
            assert top.alternatives[0].logprob == pytest.approx(logprob, abs=1e-5)
        sampling = gen.SamplingParams(max_new_tokens=6, ignore_eos=True, presence_penalty=2.0)
        penalized = stub.Generate(gen.GenerateRequest(input=gen.GenerationInput(prompt=PROMPT, sampling=sampling)),
                                  timeout=60, metadata=bearer(ACME))
        assert len(set(penalized.token_ids)) == 6
        with pytest.raises(grpc.RpcError) as caught:
            bad = gen.SamplingParams(max_new_tokens=6, presence_penalty=3.0)
            stub.Generate(gen.GenerateRequest(input=gen.GenerationInput(prompt=PROMPT, sampling=bad)),
                          timeout=60, metadata=bearer(ACME))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_tokenize_detokenize_health_ready_and_metrics(server):
    running = server[0]
    base = f"http://127.0.0.1:{running.http_port}"
    headers = {"Authorization": f"Bearer {ACME}"}
    tokens = httpx.post(f"{base}/tokenize", json={"prompt": PROMPT}, headers=headers, timeout=30).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    text = httpx.post(f"{base}/detokenize", json={"tokens": tokens["tokens"]}, headers=headers, timeout=30).json()
    assert text["prompt"].endswith(PROMPT)
    chat = httpx.post(f"{base}/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}, headers=headers,
                      timeout=30).json()
    assert chat["count"] > 2
    assert httpx.post(f"{base}/tokenize", json={"prompt": "x"}, timeout=30).status_code == 401
    assert httpx.get(f"{base}/health", timeout=30).status_code == 200
    assert httpx.get(f"{base}/ready", timeout=30).json() == {"status": "ready"}
    samples = scrape(running.metrics_port)
    http_ok = sum(v for (name, labels), v in samples.items()
                  if name == "loraplex_requests_total" and ("api", "http") in labels and ("code", "200") in labels)
    assert http_ok >= 5
    assert any(name == "loraplex_lora_requests_info" for name, _ in samples)


def test_unload_adapter_and_413(server):
    running, _config, roots, _loop = server
    base = f"http://127.0.0.1:{running.http_port}"
    admin = {"Authorization": f"Bearer {ADMIN}"}
    assert httpx.post(f"{base}/v1/load_lora_adapter", json={"lora_name": "temp", "lora_path": str(roots / "temp")},
                      headers=admin, timeout=60).status_code == 200
    _client(server).completions.create(model="temp", prompt=PROMPT, **GREEDY)
    assert httpx.post(f"{base}/v1/unload_lora_adapter", json={"lora_name": "temp"}, headers=admin,
                      timeout=60).status_code == 200
    with pytest.raises(openai.NotFoundError):
        _client(server).completions.create(model="temp", prompt=PROMPT, **GREEDY)
    outside = httpx.post(f"{base}/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": "/etc"},
                         headers=admin, timeout=60)
    assert outside.status_code == 403 and outside.json()["error"]["type"] == "permission_error"
    huge = httpx.post(f"{base}/v1/completions", content=b"{" + b" " * (5 * 2**20) + b"}", headers=admin, timeout=60)
    assert huge.status_code == 413


def test_tls_http(server, tmp_path):
    running, config, _roots, loop = server
    cert, key = self_signed_cert(tmp_path, "localhost", "IP:127.0.0.1")
    from dataclasses import replace

    from loraplex.server.http.server import start_http

    secure = loop.run(start_http(replace(config, tls_cert=str(cert), tls_key=str(key)), running.state, port=0))
    try:
        reply = httpx.get(f"https://127.0.0.1:{secure.port}/v1/models", verify=str(cert), timeout=30,
                          headers={"Authorization": f"Bearer {ACME}"})
        assert reply.status_code == 200 and reply.json()["data"][0]["id"] == BASE
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{secure.port}/health", timeout=10).raise_for_status()
    finally:
        loop.run(secure.stop(1.0))


def test_bench_over_the_openai_api(server, tmp_path, capsys):
    from loraplex.cli import main

    result_file = tmp_path / "bench.json"
    code = main(["bench", "--api", "openai", "--base-url", _url(server), "--api-key", ACME, "--num-prompts", "6",
                 "--concurrency", "3", "--adapters", "tone,legal", "--input-len", "8", "--output-len", "5",
                 "--warmup", "1", "--json", str(result_file), "--no-progress"])
    assert code == 0, capsys.readouterr()
    stats = json.loads(result_file.read_text())["runs"][0]["stats"]
    assert stats["completed"] == 6 and stats["failed"] == 0 and stats["output_tokens"] == 30
    assert stats["ttft"]["p50_ms"] > 0 and stats["itl"]["count"] > 0
    assert main(["bench", "--api", "openai", "--base-url", _url(server), "--api-key", "bad-key-000",
                 "--num-prompts", "1", "--no-progress"]) != 0


def test_streamed_chat_with_n_choices(server):
    chunks = list(_client(server).chat.completions.create(
        model="tone", messages=[{"role": "user", "content": "Tell me"}], n=2, temperature=1.0, seed=5,
        max_tokens=5, stream=True, extra_body={"ignore_eos": True}))
    by_index: dict[int, list] = {0: [], 1: []}
    for chunk in chunks:
        for choice in chunk.choices:
            by_index[choice.index].append(choice)
    for choices in by_index.values():
        assert choices[0].delta.role == "assistant"
        assert [c.finish_reason for c in choices].count("length") == 1 and choices[-1].finish_reason == "length"
    whole = _client(server).chat.completions.create(
        model="tone", messages=[{"role": "user", "content": "Tell me"}], n=2, temperature=1.0, seed=5,
        max_tokens=5, extra_body={"ignore_eos": True})
    for choice in whole.choices:
        streamed = "".join(c.delta.content or "" for c in by_index[choice.index])
        assert streamed == choice.message.content


def test_readme_openai_example_runs(server, capsys):
    """The README's "Use it with the OpenAI SDK" block, against this server (its adapter names swapped)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Use it with the OpenAI SDK", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    code = (code.replace("http://127.0.0.1:8000/v1", _url(server)).replace('"SECRET1234"', repr(ACME))
            .replace("support-tone@2", "tone@1").replace("support-tone", "tone"))
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert f"'{BASE}'" in printed and "'tone@1'" in printed


def test_prefix_cache_usage_reset_and_metrics(server):
    """A repeated long prompt reports its cached tokens (HTTP usage.prompt_tokens_details and the
    gRPC Usage field) with the same output; the admin reset (HTTP and gRPC) forgets them."""
    from loraplex.v1 import server_pb2 as srv
    from loraplex.v1 import server_pb2_grpc

    running = server[0]
    base = f"http://127.0.0.1:{running.http_port}"
    assert httpx.post(f"{base}/reset_prefix_cache", headers={"Authorization": f"Bearer {ACME}"}).status_code == 403
    reset = httpx.post(f"{base}/reset_prefix_cache", headers={"Authorization": f"Bearer {ADMIN}"})
    assert reset.status_code == 200 and reset.json() == {"reset": True}
    system = "You are a careful assistant for a bakery. " * 12              # > 4 KV blocks of 16
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Opening hours?"}]
    client = _client(server)
    first = client.chat.completions.create(model="tone", messages=messages, **GREEDY)
    again = client.chat.completions.create(model="tone", messages=messages, **GREEDY)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 64 <= cached < again.usage.prompt_tokens and cached % 16 == 0
    assert again.choices[0].message.content == first.choices[0].message.content
    other = client.chat.completions.create(model="legal", messages=messages, **GREEDY)
    assert other.usage.prompt_tokens_details.cached_tokens == 0          # another adapter: never shared
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        chat = gen.ChatMessages(messages=[gen.ChatMessage(role=m["role"], content=m["content"]) for m in messages])
        request = gen.GenerateRequest(input=gen.GenerationInput(
            chat=chat, adapter_id="tone", sampling=gen.SamplingParams(max_new_tokens=8, ignore_eos=True)))
        reply = stub.Generate(request, timeout=60, metadata=bearer(ACME))
        assert reply.usage.cached_tokens == cached and reply.text == first.choices[0].message.content
        admin = server_pb2_grpc.ServerServiceStub(channel)
        with pytest.raises(grpc.RpcError) as denied:
            admin.ResetPrefixCache(srv.ResetPrefixCacheRequest(), timeout=30, metadata=bearer(ACME))
        assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert admin.ResetPrefixCache(srv.ResetPrefixCacheRequest(), timeout=30, metadata=bearer(ADMIN)).reset
        assert stub.Generate(request, timeout=60, metadata=bearer(ACME)).usage.cached_tokens == 0
    samples = scrape(running.metrics_port)
    assert samples[("loraplex_prefix_cache_hits_total", ())] >= 2 * cached
    assert samples[("loraplex_prefix_cache_queries_total", ())] > samples[("loraplex_prefix_cache_hits_total", ())]
