"""Tiny random models for tests (importable by name: no test imports conftest)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def build_tiny_llama(out_dir: Path, tokenizer_src: Path, **overrides) -> Path:
    """Save a random tiny Llama (float32 safetensors) plus the default model's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    params = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
        pad_token_id=2,
    )
    params.update(overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**params)).eval()
    model.save_pretrained(out_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "special_tokens_map.json"):
        if (tokenizer_src / name).exists():
            shutil.copy(tokenizer_src / name, out_dir / name)
    return out_dir
