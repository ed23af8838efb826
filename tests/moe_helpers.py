"""Tiny random Qwen3-MoE models (transformers' own config and model classes) and PEFT adapters
for them, for the MoE oracle tests."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_MOE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=True,
                bos_token_id=1, eos_token_id=2)
EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def save_tiny_qwen3_moe(path: Path, seed: int = 0, **overrides) -> Path:
    """A random 2-layer Qwen3-MoE (8 experts, top-2) saved by transformers. The router is drawn
    wide (std 0.5) so the top-k choice is far from ties, the experts and q/k norms so that
    they matter."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**TINY_MOE, **overrides})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 0.5)
            elif name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                param.normal_(0.0, 0.15)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                param.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return path


def save_moe_adapters(model_dir: Path, root: Path, configs: dict[str, dict], first_seed: int = 10) -> dict[str, Path]:
    """One PEFT adapter per name (LoraConfig keyword arguments; expert targeting through
    target_parameters), random non-zero A and B, saved under root/name; their paths."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dirs = {}
    for i, (name, kwargs) in enumerate(configs.items()):
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        torch.manual_seed(first_seed + i)
        model = get_peft_model(base, LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **kwargs))
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_" in param_name:
                    param.copy_(torch.randn_like(param) * 0.2)
        model.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


def copy_dequantized_weights(hf_model, model) -> None:
    """Overwrite a transformers Qwen3-MoE's attention and expert weights with our (maybe
    quantized) model's dequantized ones: transformers then computes on the weights we serve."""
    with torch.no_grad():
        for layer, hf_layer in zip(model.layers, hf_model.model.layers):
            q, k, v = layer.qkv_proj.base.dequantized_weight().split(layer.qkv_proj.out_sizes)
            attn = hf_layer.self_attn
            for target, weight in ((attn.q_proj, q), (attn.k_proj, k), (attn.v_proj, v),
                                   (attn.o_proj, layer.o_proj.base.dequantized_weight())):
                target.weight.copy_(weight)
            experts = hf_layer.mlp.experts
            for e in range(model.config.moe.num_experts):
                experts.gate_up_proj[e].copy_(layer.moe.gate_up[e].dequantized_weight())
                experts.down_proj[e].copy_(layer.moe.down[e].dequantized_weight())
