"""Gemma 2 and Gemma 3 (text) decoders over packed ragged batches.

A Gemma layer is a Llama layer with: RMSNorm weights applied as (1 + w); a norm after attention
and a norm before and after the MLP (`post_attention_layernorm`, `pre_feedforward_layernorm`,
`post_feedforward_layernorm`); a GeGLU MLP (gelu_pytorch_tanh(gate) * up); queries scaled by
query_pre_attn_scalar ** -0.5; sliding-window and global layers alternating (gemma_config.py),
Gemma 3's sliding layers with their own rotary base; Gemma 3's per-head q/k norms; Gemma 2's
attention-score soft-capping (softcap_attention.py). The model scales the embeddings by
sqrt(hidden_size) and soft-caps the final logits where configured.

Projections, LoRA hooks and the paged KV cache are the Llama model's (same ProjLinear targets,
so adapters and quantized backends apply unchanged). Decode steps take this layer path: the
one-call native decode stack runs the Llama layer only (decode_stack.stack_supports).
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..layers.base import QuantSpec
from ..layers.dense import DenseLinear
from ..layers.proj import ProjLinear
from .attention import AttentionPlan, paged_attention, paged_attention_ref, plan_attention
from .config import ModelConfig
from .context import ForwardContext, embed_tokens
from .fused_ops import TORCH_OPS, LayerOps
from .gemma_config import GemmaSpec
from .kv_cache import LayerKVCache
from .loader import CheckpointReader, load_dense, load_lm_head, load_projections
from .qwen3 import HeadNorm
from .rope import RotaryEmbedding
from .softcap_attention import softcap_attention

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionPlan], torch.Tensor]
_ATTENTION = {"fast": paged_attention, "reference": paged_attention_ref}
_INITIAL_ROPE_POSITIONS = 8192
_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


def gelu_tanh_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2 I] (gate columns first) -> gelu_tanh(gate) * up [T, I] (GeGLU)."""
    inter = gate_up.shape[1] // 2
    return F.gelu(gate_up[:, :inter], approximate="tanh").mul_(gate_up[:, inter:])


class GemmaDecoderLayer(torch.nn.Module):
    def __init__(self, config: ModelConfig, projections: dict[str, ProjLinear], norms: list[torch.Tensor],
                 attention: AttentionFn, window: int | None, head_norm: HeadNorm | None):
        super().__init__()
        self.qkv_proj, self.o_proj = projections["qkv_proj"], projections["o_proj"]
        self.gate_up_proj, self.down_proj = projections["gate_up_proj"], projections["down_proj"]
        self.projections = (self.qkv_proj, self.o_proj, self.gate_up_proj, self.down_proj)
        self.norms = norms                   # (1 + w) [hidden] each, in _NORMS order
        self.attention = attention
        self.window = window                 # None: global attention
        self.head_norm = head_norm           # Gemma 3: (1 + w) per-head q/k RMSNorm
        self.eps = config.rms_norm_eps
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim, self.q_size = config.head_dim, config.q_size

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, ctx: ForwardContext,
                plan: AttentionPlan, rope: tuple[torch.Tensor, torch.Tensor], kv_cache: LayerKVCache,
                ops: LayerOps) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden [T, hidden], residual) -> (this layer's post-feedforward-normed MLP output,
        updated residual); the same residual protocol as llama.DecoderLayer. Writes K/V."""
        num_tokens, lora = hidden.shape[0], ctx.lora
        qkv_proj, o_proj, gate_up_proj, down_proj = self.projections
        input_norm, post_attention_norm, pre_ff_norm, post_ff_norm = self.norms
        if residual is None:
            normed, residual = ops.add_rms_norm(hidden, None, input_norm, self.eps), hidden
        else:
            normed = ops.add_rms_norm(hidden, residual, input_norm, self.eps)
        qkv = qkv_proj(normed, lora)                                            # [T, q + 2 kv]
        if self.head_norm is not None:
            self.head_norm(qkv)
        k_cache, v_cache = kv_cache
        ops.rope_write_kv(qkv, rope[0], rope[1], k_cache, v_cache, ctx.attn.slot_mapping,
                          self.num_heads, self.num_kv_heads)
        q = qkv[:, : self.q_size].view(num_tokens, self.num_heads, self.head_dim)
        attn = self.attention(q, k_cache, v_cache, plan)                        # [T, H, hd]
        attn_out = o_proj(attn.reshape(num_tokens, self.q_size), lora)          # [T, hidden]
        attn_out = ops.add_rms_norm(attn_out, None, post_attention_norm, self.eps)
        normed = ops.add_rms_norm(attn_out, residual, pre_ff_norm, self.eps)    # residual += attn
        act = gelu_tanh_mul(gate_up_proj(normed, lora))                         # [T, inter]
        return ops.add_rms_norm(down_proj(act, lora), None, post_ff_norm, self.eps), residual

    __call__ = forward


class GemmaCausalLM(torch.nn.Module):
    """forward(input_ids [T], ctx, kv_caches) -> hidden [T, hidden]; compute_logits -> float32
    (soft-capped where configured). The interface of llama.CausalLM."""

    def __init__(self, config: ModelConfig, layers: list[GemmaDecoderLayer], embed: torch.Tensor,
                 final_norm: torch.Tensor, lm_head: DenseLinear, ops: LayerOps = TORCH_OPS):
        super().__init__()
        gemma: GemmaSpec = config.gemma
        self.config, self.gemma = config, gemma
        self.layers = torch.nn.ModuleList(layers)
        self.register_buffer("embed", embed)             # [vocab, hidden]
        self.register_buffer("final_norm", final_norm)   # (1 + w) [hidden]
        self.lm_head = lm_head
        self.ops = ops
        self.decode_stack = None                         # the native stack runs the Llama layer only
        self.embed_scale = torch.tensor(config.hidden_size ** 0.5, dtype=embed.dtype, device=embed.device)
        positions = min(config.max_position_embeddings, _INITIAL_ROPE_POSITIONS)
        global_rope = RotaryEmbedding(gemma.global_rope, config.head_dim, positions, embed.dtype, embed.device)
        local_rope = (global_rope if gemma.local_rope == gemma.global_rope else
                      RotaryEmbedding(gemma.local_rope, config.head_dim, positions, embed.dtype, embed.device))
        self.rotaries = {None: global_rope, **{w: local_rope for w in gemma.layer_windows if w is not None}}

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def ensure_positions(self, num_positions: int) -> None:
        for rotary in set(self.rotaries.values()):
            rotary.ensure_length(num_positions)

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext,
                kv_caches: list[LayerKVCache]) -> torch.Tensor:
        ops = self.ops
        hidden = embed_tokens(self.embed, input_ids, ctx)                      # [T, hidden]
        hidden.mul_(self.embed_scale)                                          # PEFT scales its deltas too
        capped = self.gemma.attn_softcap is not None
        plans = {window: plan_attention(ctx.attn, self.gemma.query_scale, window, hidden.dtype,
                                        None if capped else ops.decode_attention,
                                        None if capped else ops.varlen_attention)
                 for window in self.rotaries}
        ropes = {window: rotary.cos_sin(ctx.positions) for window, rotary in self.rotaries.items()}
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(hidden, residual, ctx, plans[layer.window], ropes[layer.window], kv_cache, ops)
        return ops.add_rms_norm(hidden, residual, self.final_norm, self.config.rms_norm_eps)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, hidden] -> [n, vocab] float32, cap * tanh(logits / cap) with a final soft-cap."""
        logits = self.lm_head.linear(hidden).float()
        cap = self.gemma.final_softcap
        return logits if cap is None else torch.tanh(logits / cap).mul_(cap)

    def lora_targets(self) -> list[ProjLinear]:
        """Every projection a LoRA delta can attach to, layer by layer (qkv, o, gate_up, down)."""
        return [proj for layer in self.layers for proj in layer.projections]

    def moe_blocks(self) -> list:
        """Gemma layers have no routed experts."""
        return []

    def linear_weight_bytes(self) -> int:
        return sum(proj.base.weight_bytes() for proj in self.lora_targets())


def build_gemma(model_dir: str | Path, config: ModelConfig, spec: QuantSpec, attention: str = "fast",
                ops: LayerOps = TORCH_OPS) -> GemmaCausalLM:
    """Load a Gemma 2 / Gemma 3 text checkpoint (config already read), quantizing at load."""
    gemma: GemmaSpec = config.gemma
    attention_fn = _ATTENTION[attention]
    if gemma.attn_softcap is not None:
        attention_fn = partial(softcap_attention, softcap=gemma.attn_softcap)
    with CheckpointReader(model_dir) as reader:
        layers = []
        for i in range(config.num_layers):
            prefix = f"model.layers.{i}."
            norms = [_one_plus(reader, prefix + name + ".weight", spec) for name in _NORMS]
            head_norm = None
            if gemma.qk_norm:
                head_norm = HeadNorm(_one_plus(reader, prefix + "self_attn.q_norm.weight", spec),
                                     _one_plus(reader, prefix + "self_attn.k_norm.weight", spec),
                                     config.num_heads, config.num_kv_heads, config.rms_norm_eps)
            layers.append(GemmaDecoderLayer(config, load_projections(reader, config, i, spec), norms, attention_fn,
                                            gemma.layer_windows[i], head_norm))
        embed = load_dense(reader, "model.embed_tokens.weight", spec)
        lm_head = DenseLinear(load_lm_head(reader, config, embed, spec), None, replace(spec, method="none"))
        model = GemmaCausalLM(config, layers, embed, _one_plus(reader, "model.norm.weight", spec), lm_head, ops)
    return model.train(False)


def _one_plus(reader: CheckpointReader, name: str, spec: QuantSpec) -> torch.Tensor:
    """A Gemma RMSNorm weight as the factor it multiplies by, 1 + w (computed in float32)."""
    return (1.0 + reader.get(name).float()).to(device=spec.device, dtype=spec.compute_dtype).contiguous()
