"""Shared helpers for the benchmark scripts: timing, prompts, engine construction."""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from loraplex.server.engine.async_engine import ADAPTER_WAIT_S

PROMPT_TEXT = (
    "Write a short story about a lighthouse keeper who discovers a message in a bottle. "
    "The story should have a beginning, a middle and an end, and mention the sea, a storm, "
    "an old map, a seagull called Pip, and a surprising visitor from a faraway island. "
)


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} cores ({cpu}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}")


def engine_step(engine):
    """engine.step(), then, when nothing could run because every request waits on an adapter
    load, a short sleep as the served loop does (AsyncEngine): a tight loop of empty steps holds
    the GIL and starves the store's loader threads (a cold load took seconds instead of ms)."""
    outputs, stats = engine.step()
    if stats.batch_size == 0 and engine.has_work():
        time.sleep(ADAPTER_WAIT_S)
    return outputs, stats


def prompt_ids(tokenizer, batch: int, length: int) -> list[list[int]]:
    """`batch` distinct prompts of exactly `length` tokens (shifted windows of one text)."""
    ids = tokenizer(PROMPT_TEXT * 8)["input_ids"]
    return [ids[i: i + length] for i in range(batch)]


@dataclass(frozen=True)
class Timing:
    median_s: float
    runs: int


def time_it(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> Timing:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return Timing(statistics.median(samples), repeats)
