"""Every Triton kernel against its torch twin on CUDA, including bfloat16 (the interpreter
cannot check bf16: see tests/unit/test_triton_interpreter.py). Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

import triton_cases

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(triton_cases.CASES))
def test_triton_kernel_matches_twin_on_cuda(case, dtype):
    triton_cases.CASES[case](dtype, "cuda")


def test_cuda_selects_the_triton_kernels():
    from loraplex.server.lora.ops import select_ops
    from loraplex.server.kernels.registry import KernelSet
    from loraplex.server.model.fused_ops import layer_ops

    kernels = KernelSet.resolve("auto", torch.float16, "cuda", log=lambda _line: None)
    assert select_ops("cuda").name == "triton"
    assert layer_ops(kernels).name == "triton"
    assert layer_ops(kernels, "torch").name == "torch"
