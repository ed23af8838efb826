"""Validated engine configuration (built by the server from flags / env / config file)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..layers.base import QUANTIZE_CHOICES
from ..layers.cpu_gemm import LINEAR_KERNEL_CHOICES
from ..kernels.native import CPU_KERNEL_CHOICES

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
ADAPTER_DTYPE_CHOICES = ("float32", "bfloat16", "float16", "compute")   # compute: the base dtype


@dataclass(frozen=True)
class EngineConfig:
    model_dir: Path
    quantize: str = "none"
    dtype: str = "auto"                 # auto = float32 on CPU, bfloat16 on CUDA
    device: str = "auto"                # auto = cuda if available else cpu
    linear_kernel: str = "auto"         # auto = prepacked oneDNN GEMMs on CPU, else F.linear
    cpu_kernels: str = "auto"           # auto = fused C++ layer ops on CPU float32 when they build
    max_loras: int = 8                  # distinct adapters per step (= device slots)
    max_lora_rank: int = 64
    adapter_dtype: str = "float32"      # float32 (PEFT default), bfloat16, float16 or compute
    max_num_seqs: int = 64
    max_batch_tokens: int = 2048
    max_model_len: int = 4096           # prompt + generated tokens per request
    max_input_tokens: int = 3072
    max_new_tokens: int = 2048          # cap on a request's max_new_tokens
    max_stop_sequences: int = 8
    max_queued_requests: int = 256
    kv_cache_memory: str = "0.25"       # bytes ("2GiB") or a fraction of free memory
    block_size: int = 16
    hqq_group_size: int = 64
    bnb_double_quant: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        problems = list(self._problems())
        if problems:
            raise ValueError("invalid engine configuration: " + "; ".join(problems))

    def _problems(self):
        if self.quantize not in QUANTIZE_CHOICES:
            yield f"quantize must be one of {', '.join(QUANTIZE_CHOICES)} (got {self.quantize!r})"
        if self.dtype not in DTYPE_CHOICES:
            yield f"dtype must be one of {', '.join(DTYPE_CHOICES)} (got {self.dtype!r})"
        if self.linear_kernel not in LINEAR_KERNEL_CHOICES:
            yield f"linear_kernel must be one of {', '.join(LINEAR_KERNEL_CHOICES)} (got {self.linear_kernel!r})"
        if self.cpu_kernels not in CPU_KERNEL_CHOICES:
            yield f"cpu_kernels must be one of {', '.join(CPU_KERNEL_CHOICES)} (got {self.cpu_kernels!r})"
        if self.adapter_dtype not in ADAPTER_DTYPE_CHOICES:
            yield f"adapter_dtype must be one of {', '.join(ADAPTER_DTYPE_CHOICES)}"
        positive = ("max_loras", "max_lora_rank", "max_num_seqs", "max_batch_tokens", "max_model_len",
                    "max_input_tokens", "max_new_tokens", "max_queued_requests", "block_size",
                    "hqq_group_size")
        for name in positive:
            if getattr(self, name) < 1:
                yield f"{name} must be >= 1 (got {getattr(self, name)})"
        if self.max_stop_sequences < 0:
            yield "max_stop_sequences must be >= 0"
        if self.max_input_tokens >= self.max_model_len:
            yield "max_input_tokens must be smaller than max_model_len"
