"""The one interface every base linear backend implements."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cpu_gemm import LINEAR_KERNEL_CHOICES

QUANTIZE_CHOICES = (
    "none", "bnb-nf4", "bnb-fp4", "bnb-int8",
    "hqq-2bit", "hqq-3bit", "hqq-4bit", "hqq-8bit", "eetq",
)


@dataclass(frozen=True)
class QuantSpec:
    """How the base model's linear layers are stored and computed."""

    method: str = "none"                    # one of QUANTIZE_CHOICES
    compute_dtype: torch.dtype = torch.float32
    device: str = "cpu"
    hqq_group_size: int = 64
    bnb_double_quant: bool = False
    bnb_int8_threshold: float = 6.0
    linear_kernel: str = "auto"             # dense GEMMs: auto, onednn (prepacked, CPU) or aten

    def __post_init__(self) -> None:
        if self.method not in QUANTIZE_CHOICES:
            raise ValueError(
                f"unknown quantization {self.method!r}; choose one of {', '.join(QUANTIZE_CHOICES)}"
            )
        if self.linear_kernel not in LINEAR_KERNEL_CHOICES:
            raise ValueError(f"unknown linear kernel {self.linear_kernel!r}; choose one of "
                             f"{', '.join(LINEAR_KERNEL_CHOICES)}")


class QuantizedLinear(torch.nn.Module):
    """A frozen linear layer y = x @ W^T + b whose W may be stored quantized.

    `apply(x)` takes activations in the compute dtype, shape [num_tokens, in_features],
    and returns [num_tokens, out_features] in the compute dtype.
    """

    in_features: int
    out_features: int

    def apply(self, x: torch.Tensor) -> torch.Tensor:  # noqa: A003 - the public name
        raise NotImplementedError

    def weight_bytes(self) -> int:
        """Resident bytes of the stored weight (quantized data plus scales/zeros) and bias."""
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor:
        """[out_features, in_features] weight in the compute dtype (for tools and tests)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x)
