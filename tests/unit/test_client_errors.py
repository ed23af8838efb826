"""Error mapping, retries, deadlines and auth metadata of Client and AsyncClient against a real
gRPC server whose servicers return scripted statuses with google.rpc rich details."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from client_harness import Fail, Reply, ScriptedServer, Stream, chunk
from loraplex.client import (AdapterNotFoundError, AdapterRejectedError, AlreadyExistsError, AsyncClient,
                             AuthenticationError, Client, DeadlineExceededError, LoraplexError, OverloadedError,
                             PermissionDeniedError, RetryPolicy, ServerError, ServerUnavailableError,
                             ValidationError)
from loraplex.v1 import generation_pb2

FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05)
NO_RETRY = RetryPolicy(max_attempts=1)


@pytest.fixture
def server():
    running = ScriptedServer()
    yield running
    running.stop()


@pytest.mark.parametrize("code, error_type", [
    (grpc.StatusCode.INVALID_ARGUMENT, ValidationError),
    (grpc.StatusCode.NOT_FOUND, AdapterNotFoundError),
    (grpc.StatusCode.FAILED_PRECONDITION, AdapterRejectedError),
    (grpc.StatusCode.ALREADY_EXISTS, AlreadyExistsError),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, OverloadedError),
    (grpc.StatusCode.UNAUTHENTICATED, AuthenticationError),
    (grpc.StatusCode.PERMISSION_DENIED, PermissionDeniedError),
    (grpc.StatusCode.UNAVAILABLE, ServerUnavailableError),
    (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceededError),
    (grpc.StatusCode.INTERNAL, ServerError),
    (grpc.StatusCode.UNKNOWN, ServerError),
    (grpc.StatusCode.UNIMPLEMENTED, ServerError),
])
def test_each_status_code_maps_to_its_exception(server, code, error_type):
    server.script.push("Generate", Fail(code, f"scripted {code.name}"))
    with Client(server.address, retry=NO_RETRY) as client, pytest.raises(error_type) as raised:
        client.generate("hi")
    error = raised.value
    assert isinstance(error, LoraplexError) and error.code is code
    assert error.message == f"scripted {code.name}"


def test_bad_request_violations_are_parsed(server):
    server.script.push("Generate", Fail(grpc.StatusCode.INVALID_ARGUMENT, "invalid request: sampling.top_p: in (0, 1]",
                                        violations={"sampling.top_p": "must be in (0, 1]"}))
    with Client(server.address) as client, pytest.raises(ValidationError) as raised:
        client.generate("hi", top_p=1.0)
    assert raised.value.violations == {"sampling.top_p": "must be in (0, 1]"}
    assert len(server.script.calls) == 1               # INVALID_ARGUMENT is never retried


def test_overloaded_carries_retry_after(server):
    server.script.push("Generate", Fail(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", retry_after_s=1.5))
    with Client(server.address, retry=NO_RETRY) as client, pytest.raises(OverloadedError) as raised:
        client.generate("hi")
    assert raised.value.retry_after == pytest.approx(1.5)


def test_overloaded_then_success_honours_retry_info(server):
    server.script.push("Generate", Fail(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", retry_after_s=0.3))
    with Client(server.address, retry=FAST_RETRY) as client:
        result = client.generate("hi")
    assert result.text == " hello"
    first, second = server.script.calls_to("Generate")
    assert second.at - first.at >= 0.3                 # waited what RetryInfo said, not the 10 ms backoff


def test_unavailable_is_retried_with_backoff_until_attempts_run_out(server):
    server.script.push("Generate", *[Fail(grpc.StatusCode.UNAVAILABLE, "warming up")] * 2)
    with Client(server.address, retry=FAST_RETRY) as client:
        assert client.generate("hi").token_ids == [5, 6]
    assert len(server.script.calls_to("Generate")) == 3
    server.script.calls.clear()
    server.script.push("Generate", *[Fail(grpc.StatusCode.UNAVAILABLE, "down")] * 5)
    with Client(server.address, retry=FAST_RETRY) as client, pytest.raises(ServerUnavailableError):
        client.generate("hi")
    assert len(server.script.calls_to("Generate")) == 4


def test_other_errors_and_writes_are_not_retried(server):
    server.script.push("Generate", Fail(grpc.StatusCode.INTERNAL, "boom"))
    server.script.push("DeleteAdapter", Fail(grpc.StatusCode.UNAVAILABLE, "draining"))
    with Client(server.address, retry=FAST_RETRY) as client:
        with pytest.raises(ServerError):
            client.generate("hi")
        with pytest.raises(ServerUnavailableError):
            client.delete_adapter("tone")
    assert len(server.script.calls) == 2


def test_stream_is_retried_before_the_first_chunk_only(server):
    server.script.push("GenerateStream", Fail(grpc.StatusCode.UNAVAILABLE, "not yet"))
    with Client(server.address, retry=FAST_RETRY) as client:
        chunks = list(client.generate_stream("hi"))
    assert "".join(c.text for c in chunks) == " hello" and chunks[-1].finish_reason == "length"
    assert len(server.script.calls_to("GenerateStream")) == 2

    server.script.push("GenerateStream", Stream([chunk(" a", [7])], then=Fail(grpc.StatusCode.UNAVAILABLE, "gone")))
    received = []
    with Client(server.address, retry=FAST_RETRY) as client, pytest.raises(ServerUnavailableError):
        for item in client.generate_stream("hi"):
            received.append(item)
    assert [c.token_ids for c in received] == [[7]]
    assert len(server.script.calls_to("GenerateStream")) == 3     # the failed stream was not re-sent


def test_deadline_exceeded_is_a_timeout(server):
    server.script.push("Generate", Reply(generation_pb2.GenerateResponse(text="late"), delay_s=2.0))
    start = time.monotonic()
    with Client(server.address) as client, pytest.raises(DeadlineExceededError) as raised:
        client.generate("hi", timeout=0.2)
    assert isinstance(raised.value, TimeoutError)
    assert time.monotonic() - start < 1.5


def test_retries_never_outlive_the_deadline(server):
    server.script.push("Generate", Fail(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", retry_after_s=5.0))
    start = time.monotonic()
    with Client(server.address, retry=FAST_RETRY) as client, pytest.raises(OverloadedError):
        client.generate("hi", timeout=1.0)
    assert time.monotonic() - start < 0.9 and len(server.script.calls) == 1


def test_api_key_is_sent_as_bearer_metadata(server):
    with Client(server.address, api_key="sekrit") as client:
        client.generate("hi")
        client.list_adapters()
    with Client(server.address) as client:
        client.info()
    keyed, listed, anonymous = server.script.calls
    assert keyed.metadata["authorization"] == "Bearer sekrit" == listed.metadata["authorization"]
    assert "authorization" not in anonymous.metadata


def test_address_and_key_from_environment(server, monkeypatch):
    monkeypatch.setenv("LORAPLEX_ADDRESS", server.address)
    monkeypatch.setenv("LORAPLEX_API_KEY", "from-env")
    with Client() as client:
        client.info()
    assert server.script.calls[0].metadata["authorization"] == "Bearer from-env"


def test_unreachable_server_says_so():
    with Client("127.0.0.1:1", retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.01)) as client, \
            pytest.raises(ServerUnavailableError) as raised:
        client.health(timeout=5)
    assert raised.value.unreachable and raised.value.address == "127.0.0.1:1"


def test_async_client_maps_errors_retries_and_streams(server):
    server.script.push("Generate", Fail(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", retry_after_s=0.2))
    server.script.push("GetAdapter", Fail(grpc.StatusCode.NOT_FOUND, "adapter 'x' not found"))
    server.script.push("GenerateStream", Stream([chunk(" a", [7])], then=Fail(grpc.StatusCode.UNAVAILABLE, "gone")))

    async def scenario():
        async with AsyncClient(server.address, api_key="k", retry=FAST_RETRY) as client:
            result = await client.generate("hi")
            with pytest.raises(AdapterNotFoundError, match="not found"):
                await client.get_adapter("x")
            received = []
            with pytest.raises(ServerUnavailableError):
                async for item in client.generate_stream("hi"):
                    received.append(item)
            with pytest.raises(DeadlineExceededError):
                server.script.push("Generate", Reply(generation_pb2.GenerateResponse(), delay_s=2.0))
                await client.generate("slow", timeout=0.2)
            return result, received

    result, received = asyncio.run(scenario())
    assert result.text == " hello" and [c.token_ids for c in received] == [[7]]
    generate_calls = server.script.calls_to("Generate")
    assert generate_calls[1].at - generate_calls[0].at >= 0.2
    assert len(server.script.calls_to("GenerateStream")) == 1
    assert all(call.metadata["authorization"] == "Bearer k" for call in server.script.calls)


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), -1.0, 0.0])
def test_non_finite_or_non_positive_timeouts_are_refused(timeout):
    """Sibling of issue 16 item 10: a NaN/inf timeout would reach gRPC as a deadline."""
    from loraplex.client import Client

    with pytest.raises(ValueError, match="finite number of seconds"):
        Client("127.0.0.1:1", timeout=timeout)
    client = Client("127.0.0.1:1")
    try:
        with pytest.raises(ValueError, match="finite number of seconds"):
            client.health(timeout=timeout)
    finally:
        client.close()
