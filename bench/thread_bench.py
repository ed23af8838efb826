"""Is stepping the engine from a second thread slower than from the main thread? (issue 36)

One engine, built on the main thread (as `loraplex serve` builds it before its step thread
starts); the same decode batch stepped from the main thread and from one long-lived worker
thread (what AsyncEngine does), interleaved in rounds so both see the same minute of a shared
machine. Also a bare F.linear (1x576 by 576x1536) timed on each thread.

Usage: python bench/thread_bench.py [--batches 1 16] [--rounds 3] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import queue
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import machine_line, prompt_ids  # noqa: E402
from engine_bench import engine_decode_tok_s, make_engine  # noqa: E402


class Worker:
    """One long-lived thread that runs the callables it is given (like the engine thread)."""

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-worker")
        self._thread.start()

    def _run(self) -> None:
        while True:
            fn, reply = self._jobs.get()
            if fn is None:
                return
            reply.put(fn())

    def call(self, fn):
        reply: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs.put((fn, reply))
        return reply.get()

    def close(self) -> None:
        self._jobs.put((None, None))
        self._thread.join(5)


def linear_us(repeats: int = 200) -> float:
    """Best-of-5 microseconds of one F.linear, 1x576 by 576x1536 (float32); the best, because
    other processes on a shared machine only ever slow a block down."""
    x, w = torch.randn(1, 576), torch.randn(1536, 576)
    with torch.inference_mode():
        for _ in range(50):
            F.linear(x, w)
        samples = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(repeats):
                F.linear(x, w)
            samples.append((time.perf_counter() - started) / repeats * 1e6)
    return min(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    from loraplex.server.model.default_model import ensure_default_model
    from transformers import AutoTokenizer

    model_dir = ensure_default_model(log=lambda _m: None)
    print(machine_line(), flush=True)
    engine = make_engine(model_dir, kv_cache_memory="1GiB")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    worker = Worker()
    main_us, thread_us = [], []
    for _ in range(4 * args.rounds):
        main_us.append(linear_us())
        thread_us.append(worker.call(linear_us))
    print(f"F.linear 1x576x1536: best main {min(main_us):.1f} us, best worker thread {min(thread_us):.1f} us; "
          f"paired worker/main ratios median {statistics.median(t / m for m, t in zip(main_us, thread_us)):.2f} "
          f"(rounds main/worker: {', '.join(f'{m:.0f}/{t:.0f}' for m, t in zip(main_us, thread_us))})", flush=True)
    for batch in args.batches:
        prompts = prompt_ids(tokenizer, batch, 32)
        ratios, mains, threads = [], [], []
        for _ in range(args.rounds):
            on_main = engine_decode_tok_s(engine, prompts, args.new_tokens)
            on_thread = worker.call(lambda: engine_decode_tok_s(engine, prompts, args.new_tokens))
            mains.append(on_main)
            threads.append(on_thread)
            ratios.append(on_thread / on_main)
        print(f"batch {batch:3d}: best main thread {max(mains):7.1f} tok/s, best worker thread {max(threads):7.1f} "
              f"tok/s; paired thread/main ratios {', '.join(f'{r:.3f}' for r in ratios)} "
              f"(median {statistics.median(ratios):.3f})", flush=True)
    worker.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
