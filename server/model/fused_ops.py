"""The small per-layer ops of the decoder, as one swappable set: pure torch or fused C++.

`TORCH_OPS` holds the pure-torch implementations (any dtype or device), which are the twins
`<kernel>_ref` of the fused kernels in kernels/csrc/layer_ops.cpp; `layer_ops(kernels)` takes
each op from a resolved kernels.registry.KernelSet (native where it was built, else the twin).
tests/unit/test_kernel_registry.py checks every pair agrees.
"""

from __future__ import annotations

from dataclasses import dataclass
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


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """x [T, hidden]. With a residual [T, hidden]: residual += x in place, return
    rms_norm(residual); without: return rms_norm(x)."""
    if residual is None:
        return rms_norm(x, weight, eps)
    return rms_norm(residual.add_(x), weight, eps)


def rope_write_kv_ref(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
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


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
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


TORCH_OPS = LayerOps("torch", add_rms_norm_ref, rope_write_kv_ref, silu_mul_ref, None)


def layer_ops(kernels, choice: str = "auto") -> LayerOps:
    """The per-layer op set of a resolved KernelSet, chosen once at start-up: the native C++
    kernels when they were built (CPU, float32); on CUDA with triton installed (unless
    --cpu-kernels torch asks for plain torch everywhere) the Triton paged attention kernels
    (decode and varlen; triton_attention.py) beside the torch ops; else plain torch.

    (decode_attention's twin is not used for serving on CPU: attention.py's batched torch path
    is faster than the twin's one-query-at-a-time semantics.)"""
    if kernels.native is not None:
        return LayerOps("native", kernels.get("add_rms_norm"), kernels.get("rope_write_kv"),
                        kernels.get("silu_mul"), kernels.get("decode_attention"))
    if kernels.triton and choice != "torch":
        return triton_layer_ops()
    return TORCH_OPS


def triton_layer_ops() -> LayerOps:
    """CUDA: the registry's Triton attention kernels, the torch ops elsewhere. Needs the triton
    package (and a GPU, or TRITON_INTERPRET=1 in tests)."""
    from ..kernels.registry import implementation

    return LayerOps("triton", add_rms_norm_ref, rope_write_kv_ref, silu_mul_ref,
                    implementation("decode_attention", "triton"),
                    implementation("varlen_attention", "triton"))
