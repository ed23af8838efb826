"""The one kernel registry: every fast kernel, where it lives, and its pure-torch twin.

Naming rule: op `foo` has its fast implementations (native C++ attribute `foo`, a torch or
Triton function `foo`) and exactly one pure-torch twin `foo_ref` with the same signature and
semantics. `KERNEL_OPS` is the table (an immutable tuple; a new kernel adds a row here and a
case in tests/unit/test_kernel_registry.py, which checks every row against its twin);
`KernelSet.resolve` picks the implementations once at start-up for a device and dtype.

Backends of an implementation:
  native  attribute of the C++ extension built from kernels/csrc (native.py): CPU float32
  torch   a faster pure-torch (or oneDNN) path, "module:function" under loraplex.server
  triton  a Triton kernel, "module:function" under loraplex.server (CUDA)
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch

BACKENDS = ("native", "torch", "triton")
_PACKAGE = "loraplex.server"

Log = Callable[[str], None]


@dataclass(frozen=True)
class KernelOp:
    """One op: its family (which csrc file / module holds it), implementations and twin."""

    name: str
    family: str
    ref: str                                   # "module:function", function == name + "_ref"
    impls: tuple[tuple[str, str], ...]         # (backend, native attribute or "module:function")

    def impl(self, backend: str) -> str | None:
        return next((where for b, where in self.impls if b == backend), None)


KERNEL_OPS: tuple[KernelOp, ...] = (
    KernelOp("decode_attention", "attention", "model.attention:decode_attention_ref",
             (("native", "decode_attention"), ("triton", "model.triton_attention:decode_attention"))),
    KernelOp("varlen_attention", "attention", "model.attention:varlen_attention_ref",
             (("triton", "model.triton_attention:varlen_attention"),)),
    KernelOp("add_rms_norm", "layer_ops", "model.fused_ops:add_rms_norm_ref",
             (("native", "add_rms_norm"),)),
    KernelOp("rope_write_kv", "layer_ops", "model.fused_ops:rope_write_kv_ref",
             (("native", "rope_write_kv"),)),
    KernelOp("silu_mul", "layer_ops", "model.fused_ops:silu_mul_ref", (("native", "silu_mul"),)),
    KernelOp("lora_bgmv", "lora", "lora.ops.reference:lora_bgmv_ref", (("native", "lora_bgmv"),)),
    KernelOp("dora_scale_rows", "dora", "lora.dora:dora_scale_rows_ref", (("native", "dora_scale_rows"),)),
    KernelOp("argmax_rows", "sampling", "engine.sampling:argmax_rows_ref",
             (("native", "argmax_rows"),)),
    KernelOp("quant_linear_4bit", "quant_gemm", "kernels.quant:quant_linear_4bit_ref",
             (("native", "quant_linear_4bit"),)),
    KernelOp("quant_linear_8bit", "quant_gemm", "kernels.quant:quant_linear_8bit_ref",
             (("native", "quant_linear_8bit"),)),
    KernelOp("decode_stack", "decode_stack", "model.decode_stack:decode_stack_ref",
             (("native", "decode_stack"),)),
    KernelOp("packed_linear", "dense_gemm", "layers.cpu_gemm:packed_linear_ref",
             (("torch", "layers.cpu_gemm:packed_linear"),)),
    KernelOp("int8_weight_only_linear", "quant_gemm", "layers.eetq_ref:int8_weight_only_linear_ref",
             (("torch", "layers.eetq_ref:int8_weight_only_linear"),)),
)


def kernel_op(name: str) -> KernelOp:
    for op in KERNEL_OPS:
        if op.name == name:
            return op
    raise KeyError(f"no kernel op {name!r} in the registry")


def load_function(where: str) -> Callable:
    """'module:function' (module relative to loraplex.server) -> the function."""
    module, _, function = where.partition(":")
    return getattr(importlib.import_module(f"{_PACKAGE}.{module}"), function)


def reference(name: str) -> Callable:
    """The pure-torch twin of op `name`."""
    return load_function(kernel_op(name).ref)


def implementation(name: str, backend: str, native: ModuleType | None = None) -> Callable | None:
    """Op `name`'s implementation on `backend`, or None when it has none (or native is not built)."""
    where = kernel_op(name).impl(backend)
    if where is None:
        return None
    if backend == "native":
        return None if native is None else getattr(native, where)
    return load_function(where)


def triton_usable(device: str | torch.device) -> bool:
    """True when `device` is CUDA, CUDA is present and the triton package is installed."""
    return (torch.device(device).type == "cuda" and torch.cuda.is_available()
            and importlib.util.find_spec("triton") is not None)


@dataclass(frozen=True)
class KernelSet:
    """The implementations chosen at start-up: the built native module (or None) and whether
    Triton kernels may be used. `get(name)` returns the fastest available, else the twin."""

    native: ModuleType | None = None
    triton: bool = False

    def get(self, name: str) -> Callable:
        for backend in self.order():
            found = implementation(name, backend, self.native)
            if found is not None:
                return found
        return reference(name)

    def backend_of(self, name: str) -> str:
        """Which backend `get(name)` returns ("ref" for the twin)."""
        for backend in self.order():
            if implementation(name, backend, self.native) is not None:
                return backend
        return "ref"

    def order(self) -> tuple[str, ...]:
        return (("triton",) if self.triton else ()) + (("native",) if self.native is not None else ())

    @classmethod
    def resolve(cls, cpu_kernels: str, dtype: torch.dtype, device: str | torch.device,
                log: Log = print) -> "KernelSet":
        """The set for a --cpu-kernels choice (auto, native, torch) on device/dtype."""
        from . import native

        return cls(native=native.resolve(cpu_kernels, dtype, device, log),
                   triton=triton_usable(device))
