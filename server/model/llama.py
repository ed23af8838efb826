"""One compact Llama-family decoder (Llama, SmolLM, Mistral, Qwen2, Qwen3, Qwen3-MoE, Phi-3) over packed ragged batches.

Tokens of all sequences are concatenated without padding; a step may mix prefill chunks and
decodes. Positions, block tables and the slot mapping come in a ForwardContext; K/V live in
the paged cache (see attention.py). Norms follow HF: float32 statistics, weight applied in the
compute dtype.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from ..layers.base import QuantSpec
from ..layers.dense import DenseLinear
from ..layers.proj import ProjLinear
from .attention import AttentionPlan, paged_attention, paged_attention_ref, plan_attention
from .config import ModelConfig
from .context import ForwardContext, embed_tokens
from .fused_ops import TORCH_OPS, LayerOps
from .gemma import GemmaCausalLM, build_gemma
from .kv_cache import LayerKVCache
from .loader import CheckpointReader, load_dense, load_lm_head, load_projections
from .moe import MoeBlock, load_moe_block
from .qwen3 import load_head_norm
from .rope import RotaryEmbedding

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionPlan], torch.Tensor]
ATTENTION_IMPLS: dict[str, AttentionFn] = {"fast": paged_attention, "reference": paged_attention_ref}
_INITIAL_ROPE_POSITIONS = 8192      # the cos/sin cache grows past this on demand


class DecoderLayer(torch.nn.Module):
    def __init__(self, config: ModelConfig, projections: dict[str, ProjLinear],
                 input_norm: torch.Tensor, post_attention_norm: torch.Tensor, attention: AttentionFn,
                 head_norm: Callable[[torch.Tensor], None] | None = None, moe: MoeBlock | None = None):
        super().__init__()
        self.head_norm = head_norm                        # Qwen3: per-head q/k RMSNorm, in place
        self.qkv_proj = projections["qkv_proj"]
        self.o_proj = projections["o_proj"]
        self.gate_up_proj = projections.get("gate_up_proj")   # None in a MoE layer: its MLP is `moe`
        self.down_proj = projections.get("down_proj")
        self.moe = moe
        # Hot-path references as plain attributes: reading a registered submodule or buffer goes
        # through nn.Module.__getattr__ (~0.5 us each, ~300 reads per decode step).
        self.projections = (self.qkv_proj, self.o_proj, self.gate_up_proj, self.down_proj)
        self.input_norm = input_norm                      # [hidden]
        self.post_attention_norm = post_attention_norm    # [hidden]
        self.attention = attention
        self.eps = config.rms_norm_eps
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.q_size

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, ctx: ForwardContext,
                plan: AttentionPlan, rope: tuple[torch.Tensor, torch.Tensor], kv_cache: LayerKVCache,
                ops: LayerOps) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden [T, hidden], residual) -> (this layer's MLP output, updated residual).

        The residual stream is carried separately and updated in place: the first layer gets
        residual None and hidden = the embeddings (which become the residual); every later
        layer adds the previous layer's output to it inside the fused norm. Writes this step's
        K/V into kv_cache.
        """
        num_tokens = hidden.shape[0]
        lora = ctx.lora
        qkv_proj, o_proj, gate_up_proj, down_proj = self.projections
        if residual is None:
            normed, residual = ops.add_rms_norm(hidden, None, self.input_norm, self.eps), hidden
        else:
            normed = ops.add_rms_norm(hidden, residual, self.input_norm, self.eps)
        qkv = qkv_proj(normed, lora)                                            # [T, q + 2 kv]
        if self.head_norm is not None:
            self.head_norm(qkv)
        k_cache, v_cache = kv_cache
        ops.rope_write_kv(qkv, rope[0], rope[1], k_cache, v_cache, ctx.attn.slot_mapping,
                          self.num_heads, self.num_kv_heads)                    # in place
        q = qkv[:, : self.q_size].view(num_tokens, self.num_heads, self.head_dim)
        attn = self.attention(q, k_cache, v_cache, plan)                        # [T, H, hd]
        attn_out = o_proj(attn.reshape(num_tokens, self.q_size), lora)
        normed = ops.add_rms_norm(attn_out, residual, self.post_attention_norm, self.eps)
        if gate_up_proj is None:
            return self.moe(normed, lora), residual
        act = ops.silu_mul(gate_up_proj(normed, lora))                          # [T, inter]
        return down_proj(act, lora), residual

    __call__ = forward    # no nn.Module hooks on the hot path (saves ~2 us per call)


class CausalLM(torch.nn.Module):
    """forward(input_ids [T], ctx, kv_caches) -> hidden [T, hidden]; compute_logits -> float32."""

    def __init__(self, config: ModelConfig, layers: list[DecoderLayer], embed: torch.Tensor,
                 final_norm: torch.Tensor, lm_head: DenseLinear, ops: LayerOps = TORCH_OPS):
        super().__init__()
        self.config = config
        self.layers = torch.nn.ModuleList(layers)
        self.register_buffer("embed", embed)             # [vocab, hidden]
        self.register_buffer("final_norm", final_norm)   # [hidden]
        self.lm_head = lm_head                           # hidden -> vocab; weight maybe the embedding
        self.ops = ops                                   # per-layer ops: torch or fused (fused_ops.py)
        self.decode_stack = None     # decode_stack.DecodeStack: decode-only steps in one native call
        self.scale = config.head_dim ** -0.5
        self.rotary = RotaryEmbedding(config.rope, config.head_dim,
                                      min(config.max_position_embeddings, _INITIAL_ROPE_POSITIONS),
                                      embed.dtype, embed.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def ensure_positions(self, num_positions: int) -> None:
        """Make rotary tables cover positions [0, num_positions)."""
        self.rotary.ensure_length(num_positions)

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext,
                kv_caches: list[LayerKVCache]) -> torch.Tensor:
        ops = self.ops
        hidden = embed_tokens(self.embed, input_ids, ctx)                      # [T, hidden]
        rope = self.rotary.cos_sin(ctx.positions)                              # [T, hd] each
        plan = plan_attention(ctx.attn, self.scale, self.config.sliding_window, hidden.dtype,
                              ops.decode_attention, ops.varlen_attention)
        stack = self.decode_stack
        if stack is not None and stack.applies(ctx, plan):
            gemms, lora = stack.gemms(hidden.shape[0]), stack.lora_args(ctx.lora)
            if gemms is not None and lora is not None:
                return stack(hidden, rope, ctx, plan, kv_caches, gemms, lora)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(hidden, residual, ctx, plan, rope, kv_cache, ops)
        return ops.add_rms_norm(hidden, residual, self.final_norm, self.config.rms_norm_eps)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, hidden] (only rows that sample) -> [n, vocab] float32."""
        return self.lm_head.linear(hidden).float()

    def lora_targets(self) -> list[ProjLinear]:
        """Every projection a LoRA delta can attach to, layer by layer (qkv, o, gate_up, down; a MoE
        layer's experts are `moe_blocks`)."""
        return [proj for layer in self.layers
                for proj in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj) if proj is not None]

    def moe_blocks(self) -> list[MoeBlock]:
        """Each MoE layer's expert block, layer by layer (empty for a dense model)."""
        return [layer.moe for layer in self.layers if layer.moe is not None]

    def linear_weight_bytes(self) -> int:
        """Resident bytes of the decoder's (quantizable) linear layers, experts included; the LM
        head is not counted."""
        return (sum(proj.base.weight_bytes() for proj in self.lora_targets())
                + sum(block.weight_bytes() for block in self.moe_blocks()))


def build_model(model_dir: str | Path, spec: QuantSpec, attention: str = "fast",
                ops: LayerOps = TORCH_OPS) -> tuple["CausalLM | GemmaCausalLM", ModelConfig]:
    """Read config.json + safetensors from model_dir and build the model, quantizing at load.

    ops: the per-layer op set (fused_ops.TORCH_OPS, or native kernels from native.resolve).
    """
    if attention not in ATTENTION_IMPLS:
        raise ValueError(f"attention={attention!r}; choose one of {', '.join(ATTENTION_IMPLS)}")
    config = ModelConfig.from_dir(model_dir)
    if config.gemma is not None:                  # Gemma 2/3: their own layer (gemma.py)
        return build_gemma(model_dir, config, spec, attention, ops), config
    attention_fn = ATTENTION_IMPLS[attention]
    with CheckpointReader(model_dir) as reader:
        layers = []
        for i in range(config.num_layers):
            prefix = f"model.layers.{i}."
            head_norm = (load_head_norm(reader, i, config.num_heads, config.num_kv_heads, config.rms_norm_eps, spec)
                         if config.qk_norm else None)
            moe = load_moe_block(reader, config, i, spec) if config.moe is not None else None
            layers.append(DecoderLayer(
                config, load_projections(reader, config, i, spec),
                load_dense(reader, prefix + "input_layernorm.weight", spec),
                load_dense(reader, prefix + "post_attention_layernorm.weight", spec), attention_fn, head_norm, moe))
        embed = load_dense(reader, "model.embed_tokens.weight", spec)
        lm_head = DenseLinear(load_lm_head(reader, config, embed, spec), None, replace(spec, method="none"))
        model = CausalLM(config, layers, embed, load_dense(reader, "model.norm.weight", spec), lm_head,
                         ops)
    return model.train(False), config   # inference mode; no dropout
