"""Qwen3's addition to the Llama layer: RMSNorm over each head's query and key (before rotary).

Qwen3 (and Qwen3-MoE) normalise every query and key head on its own with a learned [head_dim]
weight, right after the q/k projections (`self_attn.q_norm`, `self_attn.k_norm`). Everything
else of a dense Qwen3 layer is a Llama layer. Statistics in float32, the weight applied in the
compute dtype, as transformers' Qwen3RMSNorm.
"""

from __future__ import annotations

import torch

from ..layers.base import QuantSpec
from .loader import CheckpointReader, load_dense


class HeadNorm:
    """In-place per-head RMSNorm of the q and k parts of a fused qkv row block."""

    def __init__(self, q_weight: torch.Tensor, k_weight: torch.Tensor, num_heads: int, num_kv_heads: int,
                 eps: float):
        self.q_weight, self.k_weight = q_weight, k_weight        # [head_dim] each
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = q_weight.shape[0]
        self.eps = eps

    def __call__(self, qkv: torch.Tensor) -> None:
        """qkv [T, q + 2 kv]: normalise its q heads and k heads in place."""
        num_tokens, hd = qkv.shape[0], self.head_dim
        q_size, kv_size = self.num_heads * hd, self.num_kv_heads * hd
        q = qkv[:, :q_size].view(num_tokens, self.num_heads, hd)                   # [T, H, hd]
        k = qkv[:, q_size: q_size + kv_size].view(num_tokens, self.num_kv_heads, hd)
        q.copy_(head_rms_norm(q, self.q_weight, self.eps))
        k.copy_(head_rms_norm(k, self.k_weight, self.eps))


def head_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., head_dim] -> RMS-normalised over the last dim, times weight [head_dim]."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def load_head_norm(reader: CheckpointReader, layer_idx: int, num_heads: int, num_kv_heads: int, eps: float,
                   spec: QuantSpec) -> HeadNorm:
    prefix = f"model.layers.{layer_idx}.self_attn."
    return HeadNorm(load_dense(reader, prefix + "q_norm.weight", spec),
                    load_dense(reader, prefix + "k_norm.weight", spec), num_heads, num_kv_heads, eps)
