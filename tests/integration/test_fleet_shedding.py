"""Issue 37 item 5 against a real fleet (slow; `make test-fleet`): the front end bounds the
generation calls in flight to what the running replicas accept (`--max-num-seqs` running +
`--max-queued-requests` waiting, per replica) and refuses the rest at once with
RESOURCE_EXHAUSTED and a retry delay (google.rpc.RetryInfo), as one `loraplex serve` does,
instead of queueing them in Ray's router without bound; a call without a key is refused at once
even while the fleet is full; once the streams end, calls are admitted again.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from fleet_harness import FleetProcess, fleet_env
from grpc_harness import free_port

pytest.importorskip("ray.serve")
pytestmark = pytest.mark.slow
USER_KEY = "team:USERKEY12345"


def _request(max_new_tokens: int):
    from loraplex.v1 import generation_pb2 as gen

    sampling = gen.SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    return gen.GenerateRequest(input=gen.GenerationInput(prompt="Count with me:", sampling=sampling))


def _retry_delay_s(error: grpc.RpcError) -> float | None:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToNanoseconds() / 1e9
    return None


def test_the_fleet_sheds_calls_beyond_what_its_replicas_accept(tiny_llama_dir, tmp_path):
    from loraplex.v1 import generation_pb2_grpc

    # One replica accepting 2 running + 1 queued: the front end admits 3 generation calls.
    fleet = FleetProcess(["--model", str(tiny_llama_dir), "--store", str(tmp_path / "store"), "--port", "0",
                          "--metrics-port", str(free_port()), "--replicas", "1", "--replica-cpus", "0.5",
                          "--max-total-tokens", "8192", "--max-input-tokens", "512", "--max-new-tokens", "8000",
                          "--max-num-seqs", "2", "--max-queued-requests", "1", "--grace-period", "5",
                          "--api-key", USER_KEY], fleet_env())
    auth = (("authorization", "Bearer " + USER_KEY.split(":")[1]),)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{fleet.port}") as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            running = []
            for _ in range(2):          # one at a time: the replica refuses a second *waiting* call
                running.append(stub.GenerateStream(_request(8000), metadata=auth, timeout=600))
                next(running[-1])                                  # it runs (its first token came)
            # Two more: the replica's queue takes one of them, the front end refuses the other.
            ended = threading.Event()
            extra = [stub.GenerateStream(_request(8000), metadata=auth, timeout=600) for _ in range(2)]
            for call in extra:
                call.add_done_callback(lambda _call: ended.set())
            assert ended.wait(120), "neither extra call was refused"
            refused = [call for call in extra if call.done()]
            assert len(refused) == 1
            error = refused[0]
            assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
            assert "the fleet's queue is full (3 requests in flight)" in error.details()
            assert _retry_delay_s(error) == pytest.approx(1.0)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as keyless:          # no key: refused at once, not queued
                stub.Generate(_request(4), timeout=60)
            assert keyless.value.code() is grpc.StatusCode.UNAUTHENTICATED
            assert time.monotonic() - started < 10
            for call in running + extra:
                call.cancel()
            deadline = time.monotonic() + 120
            while True:                                            # cancelled calls leave the bound
                try:
                    reply = stub.Generate(_request(4), metadata=auth, timeout=60)
                    break
                except grpc.RpcError as retry:
                    assert retry.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, retry.details()
                    assert time.monotonic() < deadline, "calls were never admitted again"
                    time.sleep(0.5)
            assert len(reply.token_ids) == 4
    finally:
        fleet.kill()
