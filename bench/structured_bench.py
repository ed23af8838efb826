"""Structured output cost: decode throughput at batch 16 with half the rows constrained by a JSON
Schema vs none, the mask time the engine thread still sees, and grammar compile times.

The constrained rows use a schema whose string must be at least 400 characters long, so they
never finish inside the measured tokens (the batch stays at 16). Constrained rows cannot use
`ignore_eos`; unconstrained ones do. Configurations alternate (none, half, none, half, ...);
each keeps its best round and the verdict uses the median of the back-to-back pair ratios.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common import engine_step, prompt_ids
from engine_bench import make_engine

ROOT = Path(__file__).resolve().parent.parent
LONG_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["title", "story"],
               "properties": {"title": {"type": "string", "maxLength": 40},
                              "story": {"type": "string", "minLength": 400}}}


@dataclass(frozen=True)
class StructuredResult:
    batch: int
    free_tok_s: float             # no row constrained (best round)
    half_tok_s: float             # half the rows constrained (best round)
    paired_ratio: float           # median of back-to-back half/free ratios
    wait_ms: float                # per constrained step: engine thread waiting for masks
    apply_ms: float               # per constrained step: masked_fill on the constrained rows
    fill_ms: float                # per constrained step: mask computation (background thread)


@dataclass(frozen=True)
class CompileResult:
    name: str
    llguidance_ms: float
    xgrammar_ms: float | None     # None when xgrammar is not installed


def _decode_tok_s(engine, prompts: list[list[int]], new_tokens: int, constrained: int) -> float:
    """Tokens/s over the steps where all rows decode (prefill excluded)."""
    from loraplex.server.engine.constraints import Constraint
    from loraplex.server.engine.io import GenerationRequest
    from loraplex.server.engine.sequence import SamplingParams

    free = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    guided = SamplingParams(max_new_tokens=new_tokens, constraint=Constraint("json_schema", json.dumps(LONG_SCHEMA)))
    for i, ids in enumerate(prompts):
        engine.add_request(GenerationRequest(request_id=f"sb-{time.monotonic_ns()}-{i}", prompt_token_ids=tuple(ids),
                                             sampling=guided if i < constrained else free))
    tokens, seconds = 0, 0.0
    while engine.has_work():
        started = time.perf_counter()
        _outputs, stats = engine_step(engine)
        elapsed = time.perf_counter() - started
        if stats.batch_tokens == stats.batch_size == len(prompts):
            tokens += stats.batch_size
            seconds += elapsed
    return tokens / seconds if seconds else 0.0


def run_structured_bench(model_dir: Path, batch: int = 16, new_tokens: int = 32, rounds: int = 3,
                         log=print) -> StructuredResult:
    from transformers import AutoTokenizer

    engine = make_engine(model_dir, max_num_seqs=batch)
    prompts = prompt_ids(AutoTokenizer.from_pretrained(model_dir), batch, 32)
    _decode_tok_s(engine, prompts, 4, batch // 2)             # warm-up: compiles the schema once
    free_runs, half_runs = [], []
    stats = engine.guided.stats
    for _ in range(rounds):
        free_runs.append(_decode_tok_s(engine, prompts, new_tokens, 0))
        steps_before, wait, apply, fill = stats.num_steps, stats.wait_s, stats.apply_s, stats.fill_s
        half_runs.append(_decode_tok_s(engine, prompts, new_tokens, batch // 2))
        log(f"  batch {batch}: none {free_runs[-1]:.1f} tok/s, half constrained {half_runs[-1]:.1f} tok/s")
    steps = max(stats.num_steps - steps_before, 1)
    return StructuredResult(
        batch=batch, free_tok_s=max(free_runs), half_tok_s=max(half_runs),
        paired_ratio=statistics.median(h / f for h, f in zip(half_runs, free_runs)),
        wait_ms=(stats.wait_s - wait) / steps * 1e3, apply_ms=(stats.apply_s - apply) / steps * 1e3,
        fill_ms=(stats.fill_s - fill) / steps * 1e3)


def run_compile_bench(model_dir: Path, log=print) -> list[CompileResult]:
    """Cold compile time of each test schema: llguidance (as served) and xgrammar."""
    from transformers import AutoTokenizer

    from loraplex.server.engine.constraints import Constraint
    from loraplex.server.engine.constraints.compiler import ConstraintCompiler

    sys.path.insert(0, str(ROOT / "tests"))
    from structured_cases import SCHEMAS

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    compiler = ConstraintCompiler(tokenizer, len(tokenizer), (tokenizer.eos_token_id,))
    compiler.tokenizer()                                        # built once, not timed
    xgr_compiler = _xgrammar_compiler(tokenizer)
    results = []
    for name, _what, schema, _budget in SCHEMAS:
        text = json.dumps(schema)
        started = time.perf_counter()
        compiler.guide(Constraint("json_schema", text))
        ours = (time.perf_counter() - started) * 1e3
        theirs = None
        if xgr_compiler is not None:
            started = time.perf_counter()
            xgr_compiler.compile_json_schema(text, any_whitespace=False)
            theirs = (time.perf_counter() - started) * 1e3
        results.append(CompileResult(name, ours, theirs))
        log(f"  {name:14s} llguidance {ours:7.2f} ms" + (f", xgrammar {theirs:7.2f} ms" if theirs else ""))
    compiler.close()
    return results


def _xgrammar_compiler(tokenizer):
    try:
        import xgrammar
    except ImportError:
        return None
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
    return xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
