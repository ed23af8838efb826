"""Helpers to drive an in-process LLMEngine in tests."""

from __future__ import annotations

import time

from pathlib import Path

import torch

from loraplex.server.engine.builder import build_engine
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.io import GenerationRequest, RequestOutput
from loraplex.server.engine.sequence import SamplingParams


def make_engine(model_dir: Path, store=None, **overrides):
    """An engine for tests; overrides are flat engine settings (EngineConfig.from_settings), and
    `quantize` (the --quantize flag's name) sets the quantization method."""
    if "quantize" in overrides:
        overrides["method"] = overrides.pop("quantize")
    settings = dict(method="none", dtype="float32", device="cpu", max_num_seqs=16, max_batch_tokens=256,
                    kv_cache_memory="256MiB", max_model_len=512, max_input_tokens=384, block_size=16)
    settings.update(overrides)
    engine, _info = build_engine(EngineConfig.from_settings(model_dir, **settings), store, log=lambda _m: None)
    return engine


def run_staggered(engine, requests: list[tuple[int, GenerationRequest]]) -> dict[str, list[RequestOutput]]:
    """Add each request at its step index; step until done. Returns outputs per request."""
    pending = sorted(requests, key=lambda pair: pair[0])
    outputs: dict[str, list[RequestOutput]] = {req.request_id: [] for _, req in requests}
    step = 0
    deadline = time.monotonic() + 600          # a safety net; the loop ends when the work is done
    while pending or engine.has_work():
        while pending and pending[0][0] <= step:
            engine.add_request(pending.pop(0)[1])
        produced, stats = engine.step()
        for out in produced:
            outputs[out.request_id].append(out)
        if stats.batch_size == 0 and engine.has_work():   # waiting on an adapter load off the step loop
            time.sleep(0.001)
        else:
            step += 1
        assert step < 10_000 and time.monotonic() < deadline, "engine did not finish"
    return outputs


def tokens_of(outputs: list[RequestOutput]) -> list[int]:
    return [t for out in outputs for t in out.token_ids]


def hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int, eos_ids) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=list(eos_ids), pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def greedy_request(request_id: str, prompt_ids: list[int], max_new_tokens: int, **kw) -> GenerationRequest:
    return GenerationRequest(request_id=request_id, prompt_token_ids=tuple(prompt_ids),
                             sampling=SamplingParams(max_new_tokens=max_new_tokens, **kw), **{})
