"""A request is validated once, at intake (issue 36): through AsyncEngine the checks without a
model (validation.check_request) and the prompt's checks (check_prompt) each run once per
request, and LLMEngine queues a ValidatedRequest without checking it again; the rejection
messages are those of the one check."""

from __future__ import annotations

import asyncio

import pytest

from engine_helpers import make_engine
from loraplex.server.engine import intake as intake_module
from loraplex.server.engine import validation
from loraplex.server.engine.async_engine import AsyncEngine
from loraplex.server.engine.io import GenerationRequest, RequestRejected, ValidatedRequest
from loraplex.server.engine.sequence import SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    return make_engine(tiny_llama_dir, cpu_kernels="torch", max_model_len=64, max_input_tokens=32)


def _count(monkeypatch, module, name: str) -> list[int]:
    calls, real = [], getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, counted)
    return calls


def test_async_engine_validates_each_request_once(engine, monkeypatch):
    checked = _count(monkeypatch, validation, "check_request")     # validate_request's every call
    prompt_checked = _count(monkeypatch, intake_module, "check_prompt")

    async def run():
        async_engine = AsyncEngine(engine, info=None)
        try:
            request = GenerationRequest("once", prompt="hello there", sampling=SamplingParams(max_new_tokens=3))
            outputs = [output async for output in async_engine.generate(request)]
            with pytest.raises(RequestRejected) as refused:
                [o async for o in async_engine.generate(GenerationRequest("bad", prompt="x" * 40 + " y" * 40))]
            return outputs, refused.value
        finally:
            await async_engine.shutdown()

    outputs, refused = asyncio.run(run())
    assert outputs[-1].finished and (len(checked), len(prompt_checked)) == (2, 2)
    assert refused.field_name == "prompt" and "the limit is 32" in refused.message


def test_a_validated_request_is_queued_unchecked(engine, monkeypatch):
    checked = _count(monkeypatch, validation, "check_request")
    request = engine.intake.prepare(GenerationRequest("v", prompt_token_ids=(5, 6, 7),
                                                      sampling=SamplingParams(max_new_tokens=2)))
    assert isinstance(request, ValidatedRequest) and request.request.sampling.max_new_tokens == 2
    engine.add_request(request)
    assert len(checked) == 1                   # intake's; add_request did not validate again
    engine.abort("v")
    with pytest.raises(RequestRejected) as bare:     # a bare request goes through intake in add_request
        engine.add_request(GenerationRequest("b", prompt_token_ids=(5,) * 40))
    assert "the limit is 32" in bare.value.message and not engine.has_work()
