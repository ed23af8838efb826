"""Allocator tuning: applied through glibc's mallopt, and off with LORAPLEX_MALLOC_TUNING=0."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from loraplex.server.host_tuning import tune_malloc


def test_can_be_switched_off():
    assert tune_malloc({"LORAPLEX_MALLOC_TUNING": "0"}) == "malloc tuning off (LORAPLEX_MALLOC_TUNING=0)"


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_raises_glibc_thresholds_in_a_fresh_process():
    """In a child process (the setting is process-wide): mallopt accepts both thresholds."""
    code = "from loraplex.server.host_tuning import tune_malloc; print(tune_malloc({}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "malloc: large per-step buffers stay in the heap (mmap/trim thresholds raised)"
