"""Torch-free settings of the layers: the quantization config and the kernel choices.

Importable without torch, so the `loraplex serve` CLI validates its flags before loading
anything; `QuantSpec` (base.py) extends `QuantConfig` with the resolved dtype and device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from ..kernels.choices import CPU_KERNEL_CHOICES
from ..problems import ConfigProblem, at_least, one_of, raise_if

QUANTIZE_CHOICES = (
    "none", "bnb-nf4", "bnb-fp4", "bnb-int8",
    "hqq-2bit", "hqq-3bit", "hqq-4bit", "hqq-8bit", "eetq",
)
# auto = measured per layer shape (layers/linear_choice.py); onednn / aten: dense GEMMs
# (cpu_gemm.py); native: fused dequantize-GEMM of quantized layers; library: the quant library's
LINEAR_KERNEL_CHOICES = ("auto", "onednn", "aten", "native", "library")


@dataclass(frozen=True)
class QuantConfig:
    """How the base model's linear layers are stored (the one home of these defaults)."""

    method: str = "none"                    # one of QUANTIZE_CHOICES
    hqq_group_size: int = 64
    bnb_double_quant: bool = False
    bnb_int8_threshold: float = 6.0
    linear_kernel: str = "auto"             # one of LINEAR_KERNEL_CHOICES

    def __post_init__(self) -> None:
        raise_if(self.problems())

    def problems(self) -> Iterator[ConfigProblem]:
        yield from one_of(self.method, QUANTIZE_CHOICES, "method")
        yield from one_of(self.linear_kernel, LINEAR_KERNEL_CHOICES, "linear_kernel")
        yield from at_least(self, 1, ("hqq_group_size",))
