"""The one interface every base linear backend implements."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .options import LINEAR_KERNEL_CHOICES, QUANTIZE_CHOICES, QuantConfig

__all__ = ["LINEAR_KERNEL_CHOICES", "QUANTIZE_CHOICES", "QuantConfig", "QuantSpec", "QuantizedLinear"]


@dataclass(frozen=True)
class QuantSpec(QuantConfig):
    """A QuantConfig resolved for one run: the compute dtype and the device the layers live on."""

    compute_dtype: torch.dtype = torch.float32
    device: str = "cpu"

    @classmethod
    def resolve(cls, config: QuantConfig, compute_dtype: torch.dtype, device: str) -> "QuantSpec":
        return cls(**{f.name: getattr(config, f.name) for f in fields(QuantConfig)},
                   compute_dtype=compute_dtype, device=device)


class QuantizedLinear(torch.nn.Module):
    """A frozen linear layer y = x @ W^T + b whose W may be stored quantized.

    `linear(x)` takes activations in the compute dtype, shape [num_tokens, in_features],
    and returns [num_tokens, out_features] in the compute dtype. (Not `apply`: that name is
    nn.Module.apply, which walks submodules; `forward` is `linear` behind nn.Module hooks.)
    """

    in_features: int
    out_features: int

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weight_bytes(self) -> int:
        """Resident bytes of the stored weight (quantized data plus scales/zeros) and bias."""
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor:
        """[out_features, in_features] weight in the compute dtype (for tools and tests)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)
