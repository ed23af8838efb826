"""The engine-core process's messages (server/engine/proc/wire.py): requests, outputs, stats and
errors cross as msgpack and come back equal, with the same error classes and fields."""

from __future__ import annotations

import pytest

from loraplex.adapters_store import errors as store_errors
from loraplex.server.engine import io
from loraplex.server.engine.constraints.spec import Constraint
from loraplex.server.engine.engine import StepStats
from loraplex.server.engine.proc import wire
from loraplex.server.engine.sequence import FinishReason, SamplingParams


def test_a_request_crosses_unchanged():
    request = io.GenerationRequest(
        "r-1", messages=(("system", "be brief"), ("user", "hi")), adapter_id="tone@2", tenant="acme",
        sampling=SamplingParams(max_new_tokens=7, temperature=0.5, top_p=0.9, seed=3, stop=("\n",),
                                stop_token_ids=(2,), top_logprobs=3,
                                constraint=Constraint("choice", choices=("yes", "no"))))
    message = wire.core_codec().decode(wire.Codec(wire.ToCore).encode(wire.Add(request, [1, 2, 3])))
    assert isinstance(message, wire.Add)
    assert message.request == request and message.prompt_ids == [1, 2, 3]


def test_a_step_crosses_with_outputs_stats_and_errors():
    output = io.RequestOutput("r-1", "hé", (5, 6), logprobs=(-0.5, -1.0), top_logprobs=(((5, -0.5),), ((6, -1.0),)),
                              finish_reason=FinishReason.LENGTH, prompt_tokens=3, generated_tokens=2,
                              timing=io.Timing(0.1, 0.2, 0.3), adapter_key="tone@2")
    failed = io.RequestOutput("r-2", "", (), finish_reason=FinishReason.ERROR,
                              error=io.RequestFailed("the output constraint failed"))
    stats = io.EngineStats(1, 2, 3, 4, 5, 6, 7, 8, 9, ("tone@2",), ("legal@1",), 4)
    step = StepStats(2, 2, 0.01, 1, 0, 0.25, 1, 0, 1)
    message = wire.front_codec().decode(wire.core_codec().encode(wire.Step([output, failed], stats, step, ["x@1"])))
    assert message.outputs[0] == output and message.stats == stats and message.step == step
    assert message.private_keys == ["x@1"]
    assert type(message.outputs[1].error) is io.RequestFailed
    assert str(message.outputs[1].error) == "the output constraint failed"


@pytest.mark.parametrize("error", [
    io.RequestRejected.of([io.Violation("sampling.top_p", "must be in (0, 1]"), io.Violation("", "empty")]),
    io.QueueFull("full", 2.5), io.EngineDraining("stopping"), io.EngineUnavailable("restarting"),
    io.AdapterUnavailable("quarantined"), io.AdapterBackendUnavailable("registry down", 4.0),
    store_errors.AdapterNotFound("no adapter 'nope'"), store_errors.StoreUnavailable("down", 3.0),
    store_errors.AdapterValidationError("rank_limit", "rank 99 > 64"),
], ids=lambda error: type(error).__name__)
def test_errors_keep_their_class_and_fields(error):
    back = wire.error_from_wire(wire.front_codec().decode(
        wire.core_codec().encode(wire.Rejected("r", wire.error_to_wire(error)))).error)
    assert type(back) is type(error) and str(back) == str(error)
    for name in ("violations", "retry_after_s", "rule"):
        assert getattr(back, name, None) == getattr(error, name, None), name


def test_an_unknown_error_becomes_request_failed_without_its_text():
    back = wire.error_from_wire(wire.error_to_wire(KeyError("secret internal detail")))
    assert type(back) is io.RequestFailed and "secret" not in str(back)


def test_engine_info_crosses_with_its_kernel_choices():
    from loraplex.server.layers.linear_choice import KernelChoice

    info = io.EngineInfo("m", "LlamaForCausalLM", "none", "float32", "cpu", "fp", 1, None, 10,
                         (KernelChoice("k", 2, ((1, "aten"),), "measured"),), "avx2")
    ready = wire.front_codec().decode(wire.core_codec().encode(wire.Ready(wire.info_to_wire(info), 7)))
    assert wire.info_from_wire(ready.info, None) == info and ready.pid == 7
