"""Structured output through the real gRPC server (tiny random Llama): SDK keywords, streaming,
the CLI flags, INVALID_ARGUMENT for invalid and pathological constraints while another
request keeps streaming, and the metrics."""

from __future__ import annotations

import concurrent.futures
import json
import re
import time

import grpc
import jsonschema
import pytest

from grpc_harness import LoopThread, free_port, rich_details, scrape, start_full_server
from loraplex.cli import main as cli_main
from loraplex.client import Client, FinishReason, ValidationError
from loraplex.server.app import drain_and_stop
from loraplex.server.config import load_server_config
from loraplex.v1 import generation_pb2 as gen
from loraplex.v1 import generation_pb2_grpc

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["ok", "n"],
          "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99}}}


def _deep_schema(depth: int = 300) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    loop = LoopThread()
    config = load_server_config({
        "model": str(tiny_llama_dir), "port": "0", "metrics_port": str(free_port()),
        "store": str(tmp_path_factory.mktemp("store")), "kv_cache_memory": "32MiB", "max_num_seqs": "8",
        "max_total_tokens": "2048", "max_input_tokens": "512", "max_new_tokens": "1500"}, {})
    running = loop.run(start_full_server(config))
    yield running
    loop.run(drain_and_stop(running, 1.0, log=lambda _m: None))
    loop.close()


@pytest.fixture(scope="module")
def client(server):
    with Client(f"127.0.0.1:{server.port}", timeout=120) as sdk:
        yield sdk


def test_sdk_keywords_constrain_unary_and_stream(client):
    result = client.generate("Status:", json_schema=SCHEMA, max_new_tokens=64, temperature=1.0, seed=4)
    assert result.finish_reason is FinishReason.EOS
    jsonschema.validate(json.loads(result.text), SCHEMA)
    chunks = list(client.generate_stream("Code:", regex=r"[A-Z]{3}-[0-9]{2}", max_new_tokens=32))
    assert re.fullmatch(r"[A-Z]{3}-[0-9]{2}", "".join(c.text for c in chunks))
    assert chunks[-1].finish_reason is FinishReason.EOS
    assert client.generate("Pick:", choice=["left", "right"], temperature=1.0).text in ("left", "right")
    grammar = 'start: "[" item ("," item)* "]"\nitem: /[a-c]/'
    assert re.fullmatch(r"\[[a-c](,[a-c])*\]", client.generate("List:", grammar=grammar, max_new_tokens=64).text)
    assert client.generate("Free:", max_new_tokens=4, ignore_eos=True).finish_reason is FinishReason.LENGTH


def test_sdk_refuses_two_constraints_locally(client):
    with pytest.raises(ValidationError, match="at most one"):
        client.generate("x", regex="a", choice=["a"])


def test_cli_flags(server, capsys, tmp_path):
    address = f"127.0.0.1:{server.port}"
    assert cli_main(["generate", "Answer:", "--address", address, "--choice", "yes", "--choice", "no"]) == 0
    assert capsys.readouterr().out.strip() in ("yes", "no")
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    assert cli_main(["generate", "Status:", "--address", address, "--json-schema", f"@{schema_file}",
                     "--max-new-tokens", "64"]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), SCHEMA)
    assert cli_main(["generate", "x", "--address", address, "--json-schema", '{"type": "strnig"}']) == 2
    assert "strnig" in capsys.readouterr().err


def _generate_error(stub, constraint: gen.Constraint) -> grpc.RpcError:
    request = gen.GenerateRequest(input=gen.GenerationInput(
        prompt="x", sampling=gen.SamplingParams(max_new_tokens=8, constraint=constraint)))
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(request, timeout=60)
    return info.value


def test_invalid_and_pathological_are_invalid_argument_while_others_flow(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    long_request = gen.GenerateStreamRequest(input=gen.GenerationInput(
        prompt="Once upon a time", sampling=gen.SamplingParams(max_new_tokens=300, ignore_eos=True)))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        stream = stub.GenerateStream(long_request, timeout=300)
        first = next(stream)                                       # the long request is running
        pending = pool.submit(lambda: [first] + list(stream))
        cases = [
            (gen.Constraint(json_schema=json.dumps({"type": "strnig"})), "strnig"),
            (gen.Constraint(json_schema="{broken"), "not valid JSON"),
            (gen.Constraint(regex="(unclosed"), "regex"),
            (gen.Constraint(grammar="start: nowhere"), "nowhere"),
            (gen.Constraint(json_schema=json.dumps(_deep_schema())), "limit"),
            (gen.Constraint(json_schema=json.dumps({"enum": ["v" * 50] * 2000})), "65536"),
            (gen.Constraint(), "set one of"),
        ]
        for constraint, problem in cases:
            started = time.monotonic()
            error = _generate_error(stub, constraint)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
            assert problem in error.details() and time.monotonic() - started < 10.0
            violations = rich_details(error)["violations"]
            assert any("constraint" in field for field in violations), violations
        assert not pending.done()                                  # still streaming meanwhile
        chunks = pending.result(timeout=300)
    assert sum(len(c.token_ids) for c in chunks) == 300
    assert chunks[-1].finish_reason == gen.FINISH_REASON_LENGTH
    channel.close()


def test_metrics_count_constrained_requests_and_compiles(server, client):
    before = scrape(server.metrics_port)
    schema = {"type": "object", "additionalProperties": False, "required": ["k"],
              "properties": {"k": {"enum": ["a", "b", "c"]}}}
    for _ in range(2):                                             # second one: cache hit, no compile
        client.generate("Key:", json_schema=schema, max_new_tokens=16)
    after = scrape(server.metrics_port)
    count = ("loraplex_constrained_requests_total", (("kind", "json_schema"),))
    compiles = ("loraplex_grammar_compile_seconds_count", (("kind", "json_schema"),))
    assert after[count] == before.get(count, 0) + 2
    assert after[compiles] == before.get(compiles, 0) + 1
