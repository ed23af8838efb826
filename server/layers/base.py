"""The one interface every base linear backend implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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
    linear_kernel: str = "auto"             # auto (measured), onednn, aten, native, library

    def __post_init__(self) -> None:
        if self.method not in QUANTIZE_CHOICES:
            raise ValueError(
                f"unknown quantization {self.method!r}; choose one of {', '.join(QUANTIZE_CHOICES)}"
            )
        if self.linear_kernel not in LINEAR_KERNEL_CHOICES:
            raise ValueError(f"unknown linear kernel {self.linear_kernel!r}; choose one of "
                             f"{', '.join(LINEAR_KERNEL_CHOICES)}")


Kernel = Callable[[torch.Tensor], torch.Tensor]      # x [T, in] -> [T, out]


class QuantizedLinear(torch.nn.Module):
    """A frozen linear layer y = x @ W^T + b whose W may be stored quantized.

    `apply(x)` takes activations in the compute dtype, shape [num_tokens, in_features],
    and returns [num_tokens, out_features] in the compute dtype. It runs `library_apply`
    (the backend library's own path) until `set_kernel_routes` picks, per row-count range,
    one of `kernel_candidates()` (kernels/linear_choice.py measures them).
    """

    in_features: int
    out_features: int
    routes: tuple[tuple[int, Kernel], ...] = ()         # (max_rows, kernel), ascending max_rows
    route_names: tuple[tuple[int, str], ...] = ()
    native_kernel: tuple | None = None                   # (extension module, QuantPack, bias)

    def apply(self, x: torch.Tensor) -> torch.Tensor:  # noqa: A003 - the public name
        rows = x.shape[0]
        for max_rows, kernel in self.routes:
            if rows <= max_rows:
                return kernel(x)
        return self.library_apply(x)

    def library_apply(self, x: torch.Tensor) -> torch.Tensor:
        """The backend library's own path (the PEFT/transformers-identical one)."""
        raise NotImplementedError

    def native_pack(self):
        """(QuantPack, float32 bias or None) for the fused quantized GEMMs, or None."""
        return None

    def attach_native(self, module) -> bool:
        """Offer the fused kernel of `module` (the built extension) as candidate "native"."""
        packed = None if module is None else self.native_pack()
        if packed is None or self.compute_dtype != torch.float32 or packed[0].codes.device.type != "cpu":
            return False
        self.native_kernel = (module, *packed)
        return True

    def kernel_candidates(self) -> dict[str, Kernel]:
        """Name -> kernel for every path this layer can serve with ("library" always)."""
        candidates: dict[str, Kernel] = {"library": self.library_apply}
        if self.native_kernel is not None:
            from ..kernels.quant import quant_linear

            module, pack, bias = self.native_kernel
            candidates["native"] = lambda x: quant_linear(module, pack, x, bias)
        return candidates

    def set_kernel_routes(self, routes: tuple[tuple[int, str], ...]) -> None:
        """Serve rows <= max_rows with the named kernel, ranges ascending; past the last one
        the library path. Drops a native pack no route uses."""
        candidates = self.kernel_candidates()
        self.routes = tuple((max_rows, candidates[name]) for max_rows, name in routes)
        self.route_names = tuple(routes)
        if all(name != "native" for _, name in routes):
            self.native_kernel = None

    def stream_bytes(self) -> int:
        """Bytes of weight data a decode step reads (the decode route's representation)."""
        first = self.route_names[0][1] if self.route_names else "library"
        if first == "native" and self.native_kernel is not None:
            _, pack, bias = self.native_kernel
            return pack.nbytes() + (0 if bias is None else bias.numel() * bias.element_size())
        return self.weight_bytes()

    def weight_bytes(self) -> int:
        """Resident bytes of the stored weight (quantized data plus scales/zeros) and bias."""
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor:
        """[out_features, in_features] weight in the compute dtype (for tools and tests)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x)
