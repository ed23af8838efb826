"""The tokenizer pool's thread runs at a lower scheduling priority (nice +TOKENIZER_NICE) than the
rest of the process (tokenizer_pool.py, issue 36), read from the kernel's /proc/self/task/<tid>/stat."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from loraplex.server.engine.tokenizer_pool import TOKENIZER_NICE, lower_thread_priority, tokenizer_pool

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")


def thread_nice(tid: int) -> int:
    """Field 19 (nice) of /proc/self/task/<tid>/stat."""
    with open(f"/proc/self/task/{tid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[16])


def test_the_pool_thread_is_niced_and_nothing_else():
    base = thread_nice(threading.get_native_id())
    pool = tokenizer_pool()
    try:
        tid = pool.submit(threading.get_native_id).result(timeout=30)
        assert tid != threading.get_native_id()
        assert thread_nice(tid) == min(19, base + TOKENIZER_NICE)
        assert pool.submit(threading.get_native_id).result(timeout=30) == tid      # one worker, reused
    finally:
        pool.shutdown(wait=True)
    assert thread_nice(threading.get_native_id()) == base                       # the caller keeps its own
    assert os.getpriority(os.PRIO_PROCESS, os.getpid()) == thread_nice(os.getpid())


def test_lowering_is_capped_and_zero_changes_nothing():
    seen: dict[str, int] = {}

    def run(name: str, increment: int) -> None:
        lowered = lower_thread_priority(increment)
        seen[name] = thread_nice(threading.get_native_id())
        seen[name + "_set"] = lowered

    base = thread_nice(threading.get_native_id())
    for name, increment in (("zero", 0), ("huge", 100)):
        worker = threading.Thread(target=run, args=(name, increment))
        worker.start()
        worker.join(timeout=30)
    assert seen["zero"] == base and seen["zero_set"] is False
    assert seen["huge"] == 19 and seen["huge_set"] is True


def test_the_engine_setting_defaults_to_the_pool_and_is_checked(tmp_path):
    from loraplex.server.config import load_server_config
    from loraplex.server.engine.config import EngineConfig
    from loraplex.server.problems import InvalidConfig

    assert EngineConfig(model_dir=tmp_path).tokenizer_nice == TOKENIZER_NICE
    config = load_server_config({"tokenizer_nice": "0"}, {})
    assert config.engine_config(tmp_path).tokenizer_nice == 0
    assert load_server_config({}, {"LORAPLEX_TOKENIZER_NICE": "19"}).tokenizer_nice == 19
    for bad in (-1, 20):
        with pytest.raises(InvalidConfig, match="tokenizer_nice"):
            EngineConfig(model_dir=tmp_path, tokenizer_nice=bad)
