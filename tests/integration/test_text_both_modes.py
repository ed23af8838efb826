"""Text, stop strings and usage through both EngineClients side by side (issue 36): the
in-process engine detokenizes in its step loop; with the engine core in its own process the
front end does (the core sends token ids). The same requests over gRPC (unary and streaming)
and HTTP (OpenAI completions, plain and SSE) must give the same text, token ids, finish reason
and usage in both, token for token (float32, tiny model; seeded sampling and greedy under a
constraint, so the random model writes varied and multi-byte text)."""

from __future__ import annotations

import threading
import time

import openai
import pytest

from grpc_harness import LoopThread, start_full_server
from loraplex.server.app import drain_and_stop, start_http_api
from loraplex.server.config import load_server_config
from loraplex.v1 import generation_pb2 as gen
from loraplex.v1 import generation_pb2_grpc

import grpc

MODES = {"in-process": False, "engine-process": True}
PROMPT = "The quick brown fox jumps over"
SEEDED = dict(temperature=1.0, seed=36, ignore_eos=True)
MULTIBYTE = "«漢字» café €€ 🚀 done"
MAX_NEW = 1000                   # far more than a stop string lets run: the request must be cut short


@pytest.fixture(scope="module")
def servers(tiny_llama_dir, tmp_path_factory):
    """One server per EngineClient, both up at once: {mode: (running, grpc channel, openai client)}."""
    loop, started = LoopThread(), {}
    try:
        for mode, process in MODES.items():
            config = load_server_config({
                "model": str(tiny_llama_dir), "port": "0", "metrics_port": "0", "cpu_kernels": "torch",
                "store": str(tmp_path_factory.mktemp(f"store-{mode}")), "kv_cache_memory": "16MiB",
                "max_total_tokens": "1100", "max_input_tokens": "64", "max_new_tokens": str(MAX_NEW),
                "served_model_name": "tiny"}, {})
            running = loop.run(start_full_server(config, engine_process=process))
            started[mode] = (running, grpc.insecure_channel(f"127.0.0.1:{running.port}"), None)
            loop.run(start_http_api(running, config, port=0))
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{running.http_port}/v1", api_key="none",
                                   max_retries=0, timeout=120)
            started[mode] = (running, started[mode][1], client)
        yield started
    finally:
        for running, channel, client in started.values():
            channel.close()
            if client is not None:
                client.close()
            loop.run(drain_and_stop(running, 1.0, log=lambda _m: None))
        loop.close()


def _input(stop=(), regex=None, max_new=24, **sampling):
    constraint = gen.Constraint(regex=regex) if regex else None
    return gen.GenerationInput(prompt=PROMPT, sampling=gen.SamplingParams(
        max_new_tokens=max_new, stop=list(stop), constraint=constraint, **sampling))


def _grpc(channel, message: gen.GenerationInput) -> dict:
    """Unary and streaming answers to one input, reduced to what both must agree on."""
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    unary = stub.Generate(gen.GenerateRequest(input=message), timeout=120)
    chunks = list(stub.GenerateStream(gen.GenerateStreamRequest(input=message), timeout=120))
    streamed = dict(text="".join(c.text for c in chunks), token_ids=[t for c in chunks for t in c.token_ids],
                    finish=chunks[-1].finish_reason, usage=(chunks[-1].usage.prompt_tokens,
                                                            chunks[-1].usage.generated_tokens))
    answer = dict(text=unary.text, token_ids=list(unary.token_ids), finish=unary.finish_reason,
                  usage=(unary.usage.prompt_tokens, unary.usage.generated_tokens))
    assert streamed == answer
    assert unary.timing.total_seconds >= unary.timing.first_token_seconds >= unary.timing.queue_seconds >= 0
    return {**answer, "chunks": [c.text for c in chunks]}


def _expected(free: dict, stop: str) -> tuple[str, int]:
    """What a stop string gives, from the unstopped run's per-token text: the text before it and
    the number of tokens up to the one whose text completes it."""
    text = free["text"]
    end = text.index(stop) + len(stop)
    emitted = 0
    for count, chunk in enumerate(free["chunks"], 1):
        emitted += len(chunk)
        if emitted >= end:
            return text[:text.index(stop)], count
    raise AssertionError(f"{stop!r} never completes in {text!r}")


def _each_mode(servers, fn):
    results = {mode: fn(channel) for mode, (_running, channel, _client) in servers.items()}
    assert results["in-process"] == results["engine-process"]
    return results["in-process"]


def test_stop_strings_over_grpc_spanning_tokens_and_multibyte(servers):
    free = _each_mode(servers, lambda channel: _grpc(channel, _input(**SEEDED)))
    pieces = free["chunks"]
    spanning = next(a[-2:] + b[:2] for a, b in zip(pieces, pieces[1:]) if len(a.strip()) >= 2 and len(b.strip()) >= 2)
    forced = _each_mode(servers, lambda channel: _grpc(channel, _input(regex=MULTIBYTE, max_new=48)))
    assert forced["text"] == MULTIBYTE and len(forced["token_ids"]) > len(MULTIBYTE.split())
    for source, stop, kwargs in ((free, spanning, SEEDED), (forced, "字» c", dict(regex=MULTIBYTE, max_new=48)),
                                 (forced, "🚀", dict(regex=MULTIBYTE, max_new=48))):
        text, count = _expected(source, stop)
        got = _each_mode(servers, lambda channel: _grpc(channel, _input(stop=(stop,), **kwargs)))
        assert (got["text"], got["finish"], got["usage"][1]) == (text, gen.FINISH_REASON_STOP, count), stop
        assert got["token_ids"] == source["token_ids"][:count]
    tail = free["text"][-2:] + "§"           # held back to the end, then released: the full text
    got = _each_mode(servers, lambda channel: _grpc(channel, _input(stop=(tail,), **SEEDED)))
    assert (got["text"], got["finish"]) == (free["text"], gen.FINISH_REASON_LENGTH)


def _completion(client: openai.OpenAI, stop: str | None, stream: bool, **extra) -> tuple:
    params = dict(model="tiny", prompt=PROMPT, max_tokens=24, temperature=1.0, seed=36, stop=stop,
                  extra_body={"ignore_eos": True, **extra})
    if not stream:
        reply = client.completions.create(**params)
        return reply.choices[0].text, reply.choices[0].finish_reason, reply.usage.completion_tokens
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **params))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, finish[-1], chunks[-1].usage.completion_tokens


def test_stop_strings_and_usage_over_http(servers):
    free = _each_mode(servers, lambda channel: _grpc(channel, _input(**SEEDED)))
    pieces = free["chunks"]
    spanning = next(a[-1:] + b[:3] for a, b in zip(pieces[3:], pieces[4:]) if a.strip() and len(b.strip()) >= 3)
    text, count = _expected(free, spanning)
    for stream in (False, True):
        answers = {mode: _completion(client, spanning, stream) for mode, (_r, _c, client) in servers.items()}
        assert answers["in-process"] == answers["engine-process"] == (text, "stop", count), stream
        plain = {mode: _completion(client, None, stream) for mode, (_r, _c, client) in servers.items()}
        assert plain["in-process"] == plain["engine-process"] == (free["text"], "length", 24), stream


def test_usage_is_the_same_token_for_token(servers):
    cases = [_input(**SEEDED), _input(regex=MULTIBYTE, max_new=48), _input(max_new=7),
             _input(stop=("zz",), max_new=9, temperature=0.7, seed=5)]
    for message in cases:
        got = _each_mode(servers, lambda channel: _grpc(channel, message))
        assert got["usage"][1] == len(got["token_ids"]) and got["usage"][0] > 0


def test_a_stop_string_ends_the_request_in_the_engine_at_once(servers):
    """The front end that finds a stop string aborts the request in the core: the engine goes
    idle after a handful of steps, not after the MAX_NEW tokens the request allowed."""
    free = _each_mode(servers, lambda channel: _grpc(channel, _input(**SEEDED)))
    index, stop = next((i, c.strip()[:2]) for i, c in enumerate(free["chunks"]) if len(c.strip()) >= 2)
    for mode, (running, channel, _client) in servers.items():
        steps, lock = [], threading.Lock()

        def count(stats, steps=steps, lock=lock) -> None:
            with lock:
                steps.append(stats.batch_size)
        running.state.engine.add_step_listener(count)
        got = _grpc(channel, _input(stop=(stop,), max_new=MAX_NEW, **SEEDED))
        assert got["finish"] == gen.FINISH_REASON_STOP and got["usage"][1] <= index + 1, mode
        _wait_idle(running)
        with lock:
            assert sum(1 for size in steps if size) < MAX_NEW // 4, (mode, len(steps))


def _wait_idle(running, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = running.state.engine.stats()
        if stats.num_running == 0 and stats.num_waiting == 0 and stats.num_free_blocks == stats.num_total_blocks:
            return
        assert time.monotonic() < deadline, f"engine not idle: {stats}"
        time.sleep(0.02)
