"""The one interface every base linear backend implements."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch

from .options import LINEAR_KERNEL_CHOICES, QUANTIZE_CHOICES, QuantConfig

__all__ = ["LINEAR_KERNEL_CHOICES", "QUANTIZE_CHOICES", "Kernel", "QuantConfig", "QuantSpec", "QuantizedLinear"]


@dataclass(frozen=True)
class QuantSpec(QuantConfig):
    """A QuantConfig resolved for one run: the compute dtype and the device the layers live on."""

    compute_dtype: torch.dtype = torch.float32
    device: str = "cpu"

    @classmethod
    def resolve(cls, config: QuantConfig, compute_dtype: torch.dtype, device: str) -> "QuantSpec":
        return cls(**{f.name: getattr(config, f.name) for f in fields(QuantConfig)},
                   compute_dtype=compute_dtype, device=device)


Kernel = Callable[[torch.Tensor], torch.Tensor]      # x [T, in] -> [T, out]


class QuantizedLinear(torch.nn.Module):
    """A frozen linear layer y = x @ W^T + b whose W may be stored quantized.

    `linear(x)` takes activations in the compute dtype, shape [num_tokens, in_features],
    and returns [num_tokens, out_features] in the compute dtype. (Not `apply`: that name is
    nn.Module.apply, which walks submodules; `forward` is `linear` behind nn.Module hooks.)
    It runs `library_linear`
    (the backend library's own path) until `set_kernel_routes` picks, per row-count range,
    one of `kernel_candidates()` (layers/linear_choice.py measures them).
    """

    in_features: int
    out_features: int
    routes: tuple[tuple[int, Kernel], ...] = ()         # (max_rows, kernel), ascending max_rows
    route_names: tuple[tuple[int, str], ...] = ()
    native_kernel: tuple | None = None                   # (extension module, QuantPack, bias)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        for max_rows, kernel in self.routes:
            if rows <= max_rows:
                return kernel(x)
        return self.library_linear(x)

    def library_linear(self, x: torch.Tensor) -> torch.Tensor:
        """The backend library's own path (the PEFT/transformers-identical one)."""
        raise NotImplementedError

    def served_route(self, rows: int) -> str:
        """The kernel name serving `rows` rows ("library" past the last route)."""
        return next((name for max_rows, name in self.route_names if rows <= max_rows), "library")

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
        candidates: dict[str, Kernel] = {"library": self.library_linear}
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
        return self.linear(x)
