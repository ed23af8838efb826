"""Each quantization backend: decode throughput and resident linear-weight bytes vs float32."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common import prompt_ids
from engine_bench import engine_decode_tok_s, make_engine

CPU_BACKENDS = ("none", "bnb-nf4", "bnb-fp4", "bnb-int8", "hqq-2bit", "hqq-3bit", "hqq-4bit",
                "hqq-8bit", "eetq")


@dataclass(frozen=True)
class BackendResult:
    method: str
    tok_s: float
    weight_bytes: int


def run_backend_bench(model_dir: Path, batch: int = 16, new_tokens: int = 16, prompt_len: int = 32,
                      methods=CPU_BACKENDS, log=print) -> list[BackendResult]:
    from transformers import AutoTokenizer

    prompts = prompt_ids(AutoTokenizer.from_pretrained(model_dir), batch, prompt_len)
    results = []
    for method in methods:
        engine = make_engine(model_dir, quantize=method, kv_cache_memory="512MiB")
        engine_decode_tok_s(engine, prompts[:2], 2)
        tok_s = engine_decode_tok_s(engine, prompts, new_tokens)
        weight_bytes = engine.runner.model.linear_weight_bytes()
        log(f"  {method:9s}: {tok_s:7.1f} tok/s, linear weights {weight_bytes / 2**20:7.1f} MiB")
        results.append(BackendResult(method, tok_s, weight_bytes))
        del engine
    return results
