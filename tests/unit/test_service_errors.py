"""Error mapping and request validation, over a real gRPC server (no model needed for these)."""

from __future__ import annotations

import math

import grpc
import pytest

from grpc_harness import LoopThread, rich_details
from loraplex.server.app import drain_and_stop, start_grpc
from loraplex.server.config import load_server_config
from loraplex.server.engine.io import (AdapterUnavailable, EngineDraining, QueueFull, RequestFailed,
                                       RequestRejected)
from loraplex.server.service.errors import map_error
from loraplex.v1 import adapters_pb2, adapters_pb2_grpc
from loraplex.v1 import generation_pb2 as gen
from loraplex.v1 import generation_pb2_grpc


@pytest.fixture(scope="module")
def channel():
    loop = LoopThread()
    config = load_server_config({"port": "0", "metrics_port": "0", "max_new_tokens": "100",
                                 "max_stop_sequences": "2"}, {})
    running = loop.run(start_grpc(config))
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    yield channel
    channel.close()
    loop.run(drain_and_stop(running, 0.5, log=lambda _m: None))
    loop.close()


def _violations(channel, generation_input: gen.GenerationInput) -> dict[str, str]:
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(gen.GenerateRequest(input=generation_input), timeout=10)
    assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    return rich_details(error.value)["violations"]


@pytest.mark.parametrize("generation_input, field", [
    (gen.GenerationInput(), "input"),
    (gen.GenerationInput(prompt=""), "input.prompt"),
    (gen.GenerationInput(chat=gen.ChatMessages()), "input.chat.messages"),
    (gen.GenerationInput(chat=gen.ChatMessages(messages=[gen.ChatMessage(role="user", content="a"),
                                                          gen.ChatMessage(role="robot", content="b")])),
     "input.chat.messages[1].role"),
    (gen.GenerationInput(prompt="x", adapter_id="../etc/passwd"), "input.adapter_id"),
    (gen.GenerationInput(prompt="x", adapter_id="tone@0"), "input.adapter_id"),
    (gen.GenerationInput(prompt="x", sampling=gen.SamplingParams(temperature=math.nan)), "input.sampling.temperature"),
    (gen.GenerationInput(prompt="x", sampling=gen.SamplingParams(top_p=math.inf)), "input.sampling.top_p"),
    (gen.GenerationInput(prompt="x", sampling=gen.SamplingParams(top_p=0)), "input.sampling.top_p"),
    (gen.GenerationInput(prompt="x", sampling=gen.SamplingParams(repetition_penalty=-1)),
     "input.sampling.repetition_penalty"),
    (gen.GenerationInput(prompt="x", sampling=gen.SamplingParams(max_new_tokens=101)),
     "input.sampling.max_new_tokens"),
    (gen.GenerationInput(prompt="x", sampling=gen.SamplingParams(max_new_tokens=0)),
     "input.sampling.max_new_tokens"),
    (gen.GenerationInput(prompt="x", sampling=gen.SamplingParams(stop=["a", "b", "c"])), "input.sampling.stop"),
    (gen.GenerationInput(prompt="x", sampling=gen.SamplingParams(stop=[""])), "input.sampling.stop"),
    (gen.GenerationInput(prompt="x", sampling=gen.SamplingParams(seed=2**63)), "input.sampling.seed"),
])
def test_invalid_fields_are_named(channel, generation_input, field):
    violations = _violations(channel, generation_input)
    assert list(violations) == [field]
    assert violations[field]


def test_all_problems_reported_together(channel):
    generation_input = gen.GenerationInput(prompt="x", adapter_id="bad id",
                                           sampling=gen.SamplingParams(temperature=-1, top_p=2))
    assert set(_violations(channel, generation_input)) == {
        "input.adapter_id", "input.sampling.temperature", "input.sampling.top_p"}


def test_upload_must_start_with_metadata(channel):
    stub = adapters_pb2_grpc.AdapterServiceStub(channel)
    chunk = adapters_pb2.UploadAdapterRequest(chunk=adapters_pb2.UploadChunk(file=1, data=b"x"))
    with pytest.raises(grpc.RpcError) as error:
        stub.UploadAdapter(iter([chunk]), timeout=10)
    assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "metadata" in rich_details(error.value)["violations"]


def test_engine_errors_map_to_codes():
    rejected = map_error(RequestRejected("input", "the prompt has 9000 tokens; the limit is 3072"))
    assert rejected.code is grpc.StatusCode.INVALID_ARGUMENT and rejected.violations[0].field == "input"
    full = map_error(QueueFull("256 requests are queued", retry_after_s=2.5))
    assert full.code is grpc.StatusCode.RESOURCE_EXHAUSTED and full.retry_after_s == 2.5
    assert map_error(EngineDraining("bye")).code is grpc.StatusCode.UNAVAILABLE
    assert map_error(AdapterUnavailable("quarantined")).code is grpc.StatusCode.FAILED_PRECONDITION
    assert map_error(RequestFailed("forward failed")).code is grpc.StatusCode.INTERNAL


def test_unknown_errors_leak_nothing(caplog):
    mapped = map_error(RuntimeError("secret path /home/x/model.bin exploded"))
    assert mapped.code is grpc.StatusCode.INTERNAL
    assert "secret" not in mapped.message and "incident" in mapped.message
    incident = mapped.message.split("incident ")[1].rstrip(")")
    assert incident in caplog.text and "exploded" in caplog.text     # logged server-side only
