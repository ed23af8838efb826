"""A plain `loraplex serve` names itself in the `loraplex-replica` trailer, on success and on errors."""

from __future__ import annotations

import os
import socket

import grpc
import pytest

from grpc_harness import LoopThread, rich_details, start_full_server
from loraplex.v1 import generation_pb2 as gen
from loraplex.v1 import generation_pb2_grpc


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    from loraplex.server.app import drain_and_stop
    from loraplex.server.config import ServerConfig

    config = ServerConfig(model=str(tiny_llama_dir), store=str(tmp_path_factory.mktemp("store")), port=0,
                          metrics_port=0, kv_cache_memory="16MiB", max_total_tokens=1024, max_input_tokens=512)
    loop = LoopThread()
    running = loop.run(start_full_server(config))
    yield running
    loop.run(drain_and_stop(running, 5, log=lambda _m: None))
    loop.close()


def _trailer(call) -> str | None:
    return dict(call.trailing_metadata() or ()).get("loraplex-replica")


def test_trailer_on_unary_stream_and_errors(server):
    name = f"{socket.gethostname()}-{os.getpid()}"
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        request = gen.GenerationInput(prompt="Hello", sampling=gen.SamplingParams(max_new_tokens=3))
        _response, call = stub.Generate.with_call(gen.GenerateRequest(input=request), timeout=60)
        assert _trailer(call) == name
        stream = stub.GenerateStream(gen.GenerateStreamRequest(input=request), timeout=60)
        assert len(list(stream)) >= 1 and _trailer(stream) == name
        bad = gen.GenerationInput(prompt="Hello", sampling=gen.SamplingParams(top_p=7.0))
        with pytest.raises(grpc.RpcError) as error:
            stub.Generate(gen.GenerateRequest(input=bad), timeout=60)
        assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert _trailer(error.value) == name
        assert "input.sampling.top_p" in rich_details(error.value)["violations"]     # details kept beside it
