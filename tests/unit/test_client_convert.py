"""Proto <-> dataclass conversions, request building, retry delays and CLI renderings."""

from __future__ import annotations

import json
import random
from datetime import datetime, timezone

import grpc
import pytest
from grpc_health.v1 import health_pb2

from client_harness import DEFAULT_GENERATION, adapter_message, chunk
from loraplex.client import (AdapterState, FinishReason, Generation, HealthStatus, OverloadedError, RetryPolicy,
                             ServerUnavailableError, ValidationError)
from loraplex.client import _convert as convert
from loraplex.client import _format as fmt
from loraplex.v1 import generation_pb2, server_pb2


def test_sampling_params_leave_unset_fields_to_the_server():
    params = convert.sampling_params({"max_new_tokens": 5, "temperature": None, "stop": "\n", "seed": 7})
    assert params.max_new_tokens == 5 and params.seed == 7 and list(params.stop) == ["\n"]
    assert not params.HasField("temperature") and not params.HasField("top_p")


def test_unknown_sampling_argument_is_a_type_error():
    with pytest.raises(TypeError, match="max_tokens"):
        convert.sampling_params({"max_tokens": 5})


def test_out_of_range_sampling_value_is_a_validation_error():
    with pytest.raises(ValidationError):
        convert.sampling_params({"max_new_tokens": -1})


def test_chat_messages_accept_dicts_and_tuples():
    chat = convert.chat_messages([{"role": "system", "content": "be brief"}, ("user", "hi")])
    assert [(m.role, m.content) for m in chat.messages] == [("system", "be brief"), ("user", "hi")]
    for bad in ([("robot", "hi")], [("user",)], [], [{"role": "user", "content": 3}]):
        with pytest.raises(ValidationError):
            convert.chat_messages(bad)


def test_generation_input_prompt_or_chat():
    plain = convert.generation_input("hello", None, "tone@2", {"max_new_tokens": 3})
    assert plain.prompt == "hello" and plain.adapter_id == "tone@2" and plain.sampling.max_new_tokens == 3
    chat = convert.generation_input(None, [("user", "hi")], None, {})
    assert chat.WhichOneof("input") == "chat" and chat.adapter_id == ""


def test_generation_and_chunks():
    result = convert.generation(DEFAULT_GENERATION)
    assert isinstance(result, Generation) and result.finish_reason is FinishReason.LENGTH
    assert result.finish_reason == "length" and result.token_ids == [5, 6] and result.adapter_id is None
    assert result.usage.generated_tokens == 2 and result.timing.total_seconds == pytest.approx(0.03)
    assert result.logprobs is None
    middle = convert.generation_chunk(chunk("a", [1], adapter_id="tone@1", logprobs=[-0.5]))
    assert middle.finish_reason is None and middle.usage is None and middle.timing is None
    assert middle.adapter_id == "tone@1" and middle.logprobs == [pytest.approx(-0.5)]
    last = convert.generation_chunk(chunk("", [], generation_pb2.FINISH_REASON_STOP,
                                          usage=generation_pb2.Usage(prompt_tokens=2, generated_tokens=1)))
    assert last.finish_reason is FinishReason.STOP and last.usage.prompt_tokens == 2


def test_adapter_info_and_server_info():
    info = convert.adapter_info(adapter_message("tone", 3), versions=[1, 3])
    assert info.ref == "tone@3" and info.versions == [1, 3] and info.state is AdapterState.READY
    assert info.created_at == datetime.fromtimestamp(1_700_000_000, timezone.utc) and info.owner is None
    server = convert.server_info(server_pb2.InfoResponse(model="m", limits=server_pb2.Limits(max_loras=4)))
    assert server.model == "m" and server.limits.max_loras == 4
    status = convert.health_status(health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING))
    assert status is HealthStatus.SERVING and str(status) == "SERVING"


def test_retry_delays_are_jittered_exponential_and_capped():
    policy = RetryPolicy(max_attempts=10, initial_backoff_s=0.1, max_backoff_s=0.5, multiplier=2, jitter=0.5)
    rng = random.Random(0)
    error = ServerUnavailableError("down")
    delays = [policy.delay_s(error, n, rng) for n in range(1, 6)]
    ceilings = [0.1, 0.2, 0.4, 0.5, 0.5]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings))
    assert policy.delay_s(error, 10, rng) is None                                  # out of attempts
    assert policy.delay_s(ValidationError("bad"), 1, rng) is None                   # not retryable
    hinted = OverloadedError("full", grpc.StatusCode.RESOURCE_EXHAUSTED)
    hinted.retry_after = 2.0
    assert policy.delay_s(hinted, 1, rng) == 2.0
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


def test_json_and_table_renderings():
    adapters = [convert.adapter_info(adapter_message("tone")), convert.adapter_info(adapter_message("legal", 2))]
    decoded = json.loads(fmt.dumps(adapters))
    assert decoded[0]["adapter_id"] == "tone" and decoded[0]["state"] == "ready"
    assert decoded[0]["created_at"].startswith("2023-11-14")
    lines = fmt.adapters_table(adapters).splitlines()
    assert lines[0].split() == list(fmt.ADAPTER_COLUMNS)
    assert lines[2].split()[:3] == ["legal", "2", "4"]
    assert "no adapters" in fmt.adapters_table([])
    assert json.loads(fmt.dumps(convert.generation(DEFAULT_GENERATION)))["finish_reason"] == "length"


@pytest.mark.parametrize("bad_id", ["tone\x00x", "tone\n", "tôn", "a\x7fb"])
def test_ids_metadata_cannot_carry_are_a_validation_error_before_any_call(bad_id):
    """Issue 31 (12): the adapter id also goes into request metadata (fleet routing); an id gRPC
    metadata cannot carry failed client-side with INTERNAL instead of the usual ValidationError."""
    from loraplex.client import AsyncClient, Client

    with Client("127.0.0.1:9", timeout=5, retry=RetryPolicy(max_attempts=1)) as client:
        with pytest.raises(ValidationError) as raised:
            client.generate("Hi", adapter_id=bad_id)
        assert "adapter_id" in raised.value.violations
        with pytest.raises(ValidationError):
            list(client.generate_stream("Hi", adapter_id=bad_id))

    async def run_async():
        async with AsyncClient("127.0.0.1:9", timeout=5, retry=RetryPolicy(max_attempts=1)) as client:
            with pytest.raises(ValidationError):
                await client.generate("Hi", adapter_id=bad_id)

    import asyncio
    asyncio.run(run_async())
