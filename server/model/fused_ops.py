"""The small per-layer ops of the decoder, as one swappable set: pure torch or fused C++.

`TORCH_OPS` holds the pure-torch implementations (any dtype or device; the reference twins);
`native_ops(module)` wraps the kernels of cpu_kernels.cpp (float32 CPU) with the same
signatures. The model calls whichever set it was built with (see native.resolve);
tests/unit/test_native_kernels.py checks every pair agrees.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch
import torch.nn.functional as F

from .attention import DecodeKernel, VarlenKernel, write_kv
from .rope import apply_rotary


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """[T, hidden] -> [T, hidden]; as HF LlamaRMSNorm (statistics in float32).

    Written out rather than F.rms_norm: the same float32 operations in the same order (bit-equal
    to HF), and about 10x faster than F.rms_norm on CPU for prefill-sized inputs (512 rows).
    """
    if x.dtype == torch.float32:
        return torch.mul(x, torch.rsqrt(torch.mean(x * x, -1, keepdim=True).add_(eps))).mul_(weight)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """x [T, hidden]. With a residual [T, hidden]: residual += x in place, return
    rms_norm(residual); without: return rms_norm(x)."""
    if residual is None:
        return rms_norm(x, weight, eps)
    return rms_norm(residual.add_(x), weight, eps)


def rope_write_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slots: torch.Tensor, num_heads: int, num_kv_heads: int) -> None:
    """qkv [T, (H + 2 KV) * hd]: rotate the q and k heads in place (cos, sin [T, hd]), then store
    k and v [T, KV, hd] at their cache slots [T]."""
    num_tokens, head_dim = qkv.shape[0], k_cache.shape[3]
    qk_width = (num_heads + num_kv_heads) * head_dim
    qk = qkv[:, :qk_width].view(num_tokens, num_heads + num_kv_heads, head_dim)
    qk.copy_(apply_rotary(qk, cos.unsqueeze(1), sin.unsqueeze(1)))
    k = qk[:, num_heads:]
    v = qkv[:, qk_width:].view(num_tokens, num_kv_heads, head_dim)
    write_kv(k, v, k_cache, v_cache, slots)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2 I] (gate columns first) -> silu(gate) * up [T, I]."""
    inter = gate_up.shape[1] // 2
    return F.silu(gate_up[:, :inter], inplace=True).mul_(gate_up[:, inter:])   # a view of gate_up


@dataclass(frozen=True)
class LayerOps:
    """The per-layer ops a DecoderLayer calls, all with the signatures above."""

    name: str
    add_rms_norm: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor, float], torch.Tensor]
    rope_write_kv: Callable[..., None]
    silu_mul: Callable[[torch.Tensor], torch.Tensor]
    decode_attention: DecodeKernel | None     # None: attention.py's torch decode path
    varlen_attention: VarlenKernel | None = None   # None: decode rows + per-chunk prefill


TORCH_OPS = LayerOps("torch", add_rms_norm, rope_write_kv, silu_mul, None)


def triton_layer_ops() -> LayerOps:
    """CUDA: the Triton paged attention kernels (decode and varlen; triton_attention.py), the
    torch ops elsewhere. Needs the triton package (and a GPU, or TRITON_INTERPRET=1 in tests)."""
    from .triton_attention import decode_attention, varlen_attention

    return LayerOps("triton", add_rms_norm, rope_write_kv, silu_mul, decode_attention,
                    varlen_attention)


def native_ops(module: ModuleType) -> LayerOps:
    """The fused kernels of a loaded cpu_kernels extension (float32, CPU only)."""
    return LayerOps("native", module.add_rms_norm, module.rope_write_kv, module.silu_mul,
                    module.decode_attention)


def select_layer_ops(device: str | torch.device, choice: str = "auto",
                     native_module: ModuleType | None = None) -> LayerOps:
    """The per-layer op set, chosen once at start-up: the fused C++ kernels when native.resolve
    built them (CPU, float32), the Triton attention kernels on CUDA when triton is installed
    (unless --cpu-kernels torch asks for plain torch everywhere), else plain torch."""
    from ..lora.ops import triton_usable

    if native_module is not None:
        return native_ops(native_module)
    if choice != "torch" and triton_usable(device):
        return triton_layer_ops()
    return TORCH_OPS
