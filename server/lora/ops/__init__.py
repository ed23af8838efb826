"""LoRA delta backends; `select_ops` picks one once at start-up (no global state)."""

from __future__ import annotations

import torch

from ...kernels.registry import triton_usable
from ..delta import LoraOps
from .reference import ReferenceOps
from .torch_ops import CostModel, TorchOps

BACKENDS = ("auto", "reference", "torch", "triton")


def select_ops(device: str | torch.device = "cpu", backend: str = "auto", cpu_kernels=None) -> LoraOps:
    """An ops object for `device`: Triton kernels on CUDA when available, else the torch path
    (which uses the fused `lora_bgmv` of cpu_kernels, a loaded native.py module, at decode)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown LoRA ops backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "reference":
        return ReferenceOps()
    if backend == "triton" or (backend == "auto" and triton_usable(device)):
        if not triton_usable(device):
            raise ValueError(f"LoRA backend 'triton' needs a CUDA device and the triton package (device={device})")
        from .triton_ops import TritonOps

        return TritonOps()
    return TorchOps(native_bgmv=None if cpu_kernels is None else cpu_kernels.lora_bgmv)


__all__ = ["BACKENDS", "CostModel", "LoraOps", "ReferenceOps", "TorchOps", "select_ops", "triton_usable"]
