"""Issue 16, engine side: an adapter whose slot load fails fails its own requests once (the rest of
the batch runs); a prompt over the byte bound is refused before tokenizing; tokenization runs
off the engine thread."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest

from engine_helpers import greedy_request, make_engine, tokens_of
from grpc_harness import make_peft_adapter
from loraplex.adapters_store.config import StoreConfig
from loraplex.adapters_store.store import AdapterStore
from loraplex.server.engine.async_engine import AsyncEngine
from loraplex.server.engine.builder import base_spec_for
from loraplex.server.engine.config import EngineConfig, RequestLimits
from loraplex.server.engine.io import GenerationRequest, RequestFailed, RequestRejected
from loraplex.server.engine.sequence import FinishReason, SamplingParams
from loraplex.server.engine.validation import check_request


@pytest.fixture
def store_with_rank8_adapter(tiny_llama_dir, tmp_path):
    """A store that accepts rank 8 (its own limit), for an engine whose slots hold rank <= 2."""
    root = tmp_path / "adapters"
    make_peft_adapter(tiny_llama_dir, root / "wide", seed=1, rank=8)
    base = base_spec_for(EngineConfig(model_dir=tiny_llama_dir))
    store = AdapterStore(tmp_path / "store", StoreConfig(allowed_register_roots=(str(root),), max_lora_rank=8), base)
    store.register_path("wide", root / "wide")
    yield store
    store.close()


def test_slot_load_failure_fails_its_requests_once_and_the_batch_runs(tiny_llama_dir, store_with_rank8_adapter):
    engine = make_engine(tiny_llama_dir, store=store_with_rank8_adapter, max_lora_rank=2, max_loras=2)
    sampling = SamplingParams(max_new_tokens=4, ignore_eos=True)
    engine.add_request(GenerationRequest(request_id="bad", prompt_token_ids=(1, 2, 3), adapter_id="wide",
                                         sampling=sampling))
    engine.add_request(greedy_request("base", [1, 2, 3, 4], 4))
    outputs: dict[str, list] = {"bad": [], "base": []}
    steps = 0
    while engine.has_work():
        produced, _stats = engine.step()           # before the fix: raised here on every step, forever
        for output in produced:
            outputs[output.request_id].append(output)
        steps += 1
        assert steps < 200, "the engine kept retrying the failing request"
    assert len(outputs["bad"]) == 1 and outputs["bad"][0].finish_reason is FinishReason.ERROR
    assert isinstance(outputs["bad"][0].error, RequestFailed)
    assert len(tokens_of(outputs["base"])) == 4 and outputs["base"][-1].finish_reason is FinishReason.LENGTH
    assert engine.scheduler.blocks.num_free_blocks == engine.scheduler.blocks.num_blocks
    assert store_with_rank8_adapter._leases.count("wide@1") == 0       # its lease was returned


def test_prompt_over_the_byte_bound_is_refused_before_tokenizing(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, max_input_tokens=64, max_model_len=128)
    limit = engine.max_prompt_bytes
    assert 64 <= limit <= 64 * 1024
    request = GenerationRequest(request_id="huge", prompt="x" * (limit + 1), sampling=SamplingParams())
    with pytest.raises(RequestRejected, match="bytes"):
        engine.add_request(request)
    with pytest.raises(RequestRejected, match="bytes"):
        engine.intake.prepare(request)
    chat = GenerationRequest(request_id="huge-chat", messages=(("user", "é" * (limit // 2 + 1)),),
                             sampling=SamplingParams())
    with pytest.raises(RequestRejected, match="bytes"):
        engine.add_request(chat)
    assert not engine.has_work()


class _ThreadRecordingTokenizer:
    """The real tokenizer, recording which threads encode with it."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.encode_threads: set[str] = set()

    def __call__(self, *args, **kwargs):
        self.encode_threads.add(threading.current_thread().name)
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def test_async_engine_tokenizes_off_the_engine_thread(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir)
    recording = _ThreadRecordingTokenizer(engine.tokenizer)
    engine.tokenizer = engine.prompts.tokenizer = recording      # intake encodes through engine.prompts
    engine.tokenizers.base = dataclasses.replace(engine.tokenizers.base, tokenizer=recording)   # ... and the base's

    async def run() -> list:
        async_engine = AsyncEngine(engine, info=None)
        try:
            request = GenerationRequest(request_id="r", prompt="hello there",
                                        sampling=SamplingParams(max_new_tokens=2, ignore_eos=True))
            return [output async for output in async_engine.generate(request)]
        finally:
            await async_engine.shutdown()

    outputs = asyncio.run(run())
    assert sum(len(o.token_ids) for o in outputs) == 2
    assert recording.encode_threads and "loraplex-engine" not in recording.encode_threads


@pytest.mark.parametrize("penalty", [1e-50, 1e-3, 1e3, 1e300, float("nan")])
def test_repetition_penalties_that_overflow_float32_are_refused(penalty):
    """Sibling of issue 16 item 1 (finite is not enough): 1e-50 becomes 0.0 in float32 and
    logits / penalty turn into inf and NaN; such penalties are refused with a range."""
    def problems(value: float) -> list:
        request = GenerationRequest(request_id="r", prompt="hi", sampling=SamplingParams(repetition_penalty=value))
        return [v for v in check_request(request, RequestLimits()) if v.field == "sampling.repetition_penalty"]

    assert problems(penalty) and "[0.01, 100]" in problems(penalty)[0].description
    assert not problems(0.01) and not problems(100.0)
