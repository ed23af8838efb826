"""The tokenizer thread of both EngineClients, at a lower OS scheduling priority than the engine.

Tokenizing a long prompt takes a core for up to seconds (issue 36); on a machine whose cores the
engine's OpenMP team uses, that slows every stream's decode. The pool's one worker raises its
own nice value by TOKENIZER_NICE (Linux sets it per thread: `setpriority(PRIO_PROCESS, tid)`),
so the kernel gives the engine's threads the CPU first and the tokenizer the rest. Only that
thread changes: the engine's threads, the event loop and the process keep their priority. Other
systems apply setpriority to the whole process, so there the pool is left as it is.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

TOKENIZER_NICE = 10     # EngineConfig.tokenizer_nice's default (--tokenizer-nice): CFS weight 110 against
                        # the engine's 1024 (about 1/10 of a core both want)


def lower_thread_priority(increment: int) -> bool:
    """Raise the calling thread's nice value by `increment` (capped at 19). Linux only: True when
    set, False elsewhere or when the kernel refuses (the thread then keeps its priority)."""
    if increment <= 0 or not sys.platform.startswith("linux"):
        return False
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
    except OSError as error:
        log.warning("cannot lower the tokenizer thread's priority: %s", error)
        return False
    return True


def tokenizer_pool(nice: int = TOKENIZER_NICE) -> ThreadPoolExecutor:
    """One worker thread ('loraplex-tokenize') whose nice value is `nice` above the process's."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraplex-tokenize",
                              initializer=lower_thread_priority, initargs=(nice,))
