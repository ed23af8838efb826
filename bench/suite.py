"""`make bench`: run the benchmark suite on the default model and rewrite BENCHMARKS.md.

Sections are measured side by side in one run; each prints progress as it goes.
Usage: python bench/suite.py [--quick] [--only SECTION ...] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import machine_line  # noqa: E402

ROOT = HERE.parent


def section_decode(model_dir: Path, quick: bool) -> str:
    from engine_bench import run_decode_bench

    batches = (1, 16) if quick else (1, 16, 64)
    results = run_decode_bench(model_dir, batches=batches, new_tokens=16 if quick else 32)
    lines = [
        "## 1. Engine decode throughput vs transformers and the dense-GEMM floor",
        "",
        "Default model, float32, CPU, prompts of 32 tokens, 32 generated tokens each (greedy,",
        "`ignore_eos`). Decode throughput only (prefill excluded). The floor runs just the model's",
        "linear layers (incl. the LM head) at the same batch size: no attention, norms or sampling.",
        "",
        "| batch | loraplex tok/s | transformers tok/s | floor tok/s | vs transformers | vs floor |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r.batch} | {r.engine_tok_s:.1f} | {r.transformers_tok_s:.1f} | "
                     f"{r.floor_tok_s:.1f} | {r.engine_tok_s / r.transformers_tok_s:.2f}x | "
                     f"{r.engine_tok_s / r.floor_tok_s:.2f}x |")
    lines += ["", "Targets (issue 3): >= 1.8x transformers at batch 16; >= 0.8x of the floor.", ""]
    return "\n".join(lines)


SECTIONS = {"decode": section_decode}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    parser.add_argument("--only", nargs="*", choices=sorted(SECTIONS), help="run only these sections")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()

    from loraplex.server.model.default_model import ensure_default_model

    model_dir = ensure_default_model()
    started = time.monotonic()
    parts = []
    for name in args.only or list(SECTIONS):
        print(f"[bench] {name} ...", flush=True)
        parts.append(SECTIONS[name](model_dir, args.quick))
    header = [
        "# loraplex benchmarks",
        "",
        f"- command: `make bench` (`python bench/suite.py{' --quick' if args.quick else ''}`)",
        f"- machine: {machine_line()}",
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- suite wall time: {time.monotonic() - started:.0f} s",
        "",
        "Every ratio below compares numbers measured side by side in this one run.",
        "",
    ]
    args.out.write_text("\n".join(header + parts))
    print(f"[bench] wrote {args.out}")
    return 0


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main())
