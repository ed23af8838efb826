"""Every Triton kernel against its torch twin on CPU, through Triton's interpreter.

TRITON_INTERPRET=1 runs a @triton.jit kernel on CPU tensors with numpy, so the CUDA kernels'
indexing, masking and numerics are checked on every `make test` without a GPU. One
subprocess per case (tests/triton_cases.py): an out-of-bounds access crashes the
interpreter's process, and that must be one failed case, not a dead test run.

bfloat16 is skipped here, for a reason in the interpreter itself: its tl.dot multiplies the
raw bf16 bit patterns and its float32 -> bfloat16 cast truncates instead of rounding to
nearest even, so no correct kernel can match there. The bf16 cases run on CUDA only
(tests/gpu/test_triton_kernels.py, scripts/gpu_check.sh).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES_FILE = Path(__file__).resolve().parents[1] / "triton_cases.py"
CASES = ("lora_shrink", "lora_expand", "lora_add_delta", "decode_attention", "varlen_attention",
         "paged_attention_plan")
BF16_REASON = ("bfloat16 under TRITON_INTERPRET is wrong in the interpreter itself (tl.dot on raw "
               "bf16 bits, truncating f32->bf16 cast); bf16 runs in tests/gpu on CUDA")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (dev extra: Linux x86_64 only)")


def run_case(case: str, dtype: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.run([sys.executable, str(CASES_FILE), case, dtype, "cpu"], env=env,
                          capture_output=True, text=True, timeout=600)


def test_case_list_matches_the_cases_module():
    sys.path.insert(0, str(CASES_FILE.parent))
    try:
        import triton_cases
    finally:
        sys.path.pop(0)
    assert set(triton_cases.CASES) == set(CASES)


@pytest.mark.parametrize("dtype", ["float32", "float16",
                                   pytest.param("bfloat16", marks=pytest.mark.skip(reason=BF16_REASON))])
@pytest.mark.parametrize("case", CASES)
def test_triton_kernel_matches_twin_in_interpreter(case, dtype):
    result = run_case(case, dtype)
    assert result.returncode == 0, (
        f"{case} {dtype} failed under TRITON_INTERPRET=1 (rc {result.returncode}):\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    assert f"ok: {case} {dtype}" in result.stdout
