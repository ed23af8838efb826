"""A short, stable identity of the served base model (architecture, shapes, quantization)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ...adapters_store.types import ATTENTION_MODULES, BaseSpec


def base_fingerprint(architecture: str, num_layers: int, hidden: int, intermediate: int, num_heads: int,
                     num_kv_heads: int, head_dim: int, vocab: int, quantization: str,
                     experts: tuple[int, int, int] | None = None) -> str:
    """E.g. 'llama-30x576-bnb-nf4-1a2b3c4d5e6f': readable prefix + sha256 of every field.
    experts: a MoE base's (num_experts, top_k, expert intermediate size)."""
    fields = {
        "architecture": architecture, "num_layers": int(num_layers), "hidden": int(hidden),
        "intermediate": int(intermediate), "num_heads": int(num_heads),
        "num_kv_heads": int(num_kv_heads), "head_dim": int(head_dim), "vocab": int(vocab),
        "quantization": quantization,
    }
    if experts is not None:
        fields["experts"] = [int(v) for v in experts]
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
    family = architecture.removesuffix("ForCausalLM").lower() or "model"
    return f"{family}-{num_layers}x{hidden}-{quantization}-{digest}"


def base_spec_from_model_config(cfg: Any, quantization: str) -> BaseSpec:
    """BaseSpec of a Llama-family config (ModelConfig or an HF-style config, duck-typed)."""
    hidden = int(_field(cfg, "hidden_size"))
    intermediate = int(_field(cfg, "intermediate_size"))
    num_heads = int(_field(cfg, "num_attention_heads", "num_heads"))
    num_kv_heads = int(_field(cfg, "num_key_value_heads", "num_kv_heads"))
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // num_heads)
    num_layers = int(_field(cfg, "num_hidden_layers", "num_layers"))
    vocab = int(_field(cfg, "vocab_size"))
    architecture = str(_field(cfg, "architecture"))
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    shapes = {
        "q_proj": (hidden, q_size), "k_proj": (hidden, kv_size), "v_proj": (hidden, kv_size),
        "o_proj": (q_size, hidden), "gate_proj": (hidden, intermediate),
        "up_proj": (hidden, intermediate), "down_proj": (intermediate, hidden),
    }
    if callable(getattr(cfg, "module_shapes", None)):    # a ModelConfig knows its own (Phi-3: fused)
        shapes = dict(cfg.module_shapes())
    experts = _experts(cfg)
    expert_shapes = {}
    if experts is not None:     # no dense MLP: the experts are 3-D parameters (mlp.experts.<name>)
        shapes = {name: shape for name, shape in shapes.items() if name in ATTENTION_MODULES}
        num_experts, _, width = experts
        expert_shapes = {"gate_up_proj": (num_experts, hidden, 2 * width), "down_proj": (num_experts, width, hidden)}
    fingerprint = base_fingerprint(architecture, num_layers, hidden, intermediate, num_heads,
                                   num_kv_heads, head_dim, vocab, quantization, experts)
    return BaseSpec(fingerprint=fingerprint, architecture=architecture, num_layers=num_layers,
                    module_shapes=shapes, quantization=quantization, vocab_size=vocab,
                    expert_shapes=expert_shapes)


def _experts(cfg: Any) -> tuple[int, int, int] | None:
    """(num_experts, top_k, expert intermediate size) of a ModelConfig's `moe` or an HF-style
    config's expert fields; None for a dense model."""
    moe = getattr(cfg, "moe", None)
    if moe is not None:
        return moe.num_experts, moe.top_k, moe.intermediate_size
    if not getattr(cfg, "num_experts", None):
        return None
    return int(cfg.num_experts), int(cfg.num_experts_per_tok), int(cfg.moe_intermediate_size)


def _field(cfg: Any, *names: str) -> Any:
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    if "architecture" in names and getattr(cfg, "architectures", None):
        return cfg.architectures[0]
    raise ValueError(f"model config has none of {', '.join(names)}")
