"""Info's decode_path: which decode-only steps run in one native call, which layer by layer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.server.engine.builder import build_engine
from loraplex.server.engine.config import EngineConfig

SETTINGS = dict(dtype="float32", device="cpu", kv_cache_memory="16MiB", max_num_seqs=4, max_model_len=256,
                max_input_tokens=128)


def qwen3_copy(llama_dir: Path, out: Path) -> Path:
    """The same weights and tokenizer as a Qwen3 checkpoint (q/k head norms of ones)."""
    shutil.copytree(llama_dir, out)
    config = json.loads((out / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    config.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=head_dim)
    (out / "config.json").write_text(json.dumps(config))
    tensors = load_file(out / "model.safetensors")
    for layer in range(config["num_hidden_layers"]):
        for norm in ("q_norm", "k_norm"):
            tensors[f"model.layers.{layer}.self_attn.{norm}.weight"] = torch.ones(head_dim)
    save_file(tensors, out / "model.safetensors")
    return out


def _info(model_dir: Path, cpu_kernels: str):
    return build_engine(EngineConfig.from_settings(model_dir, cpu_kernels=cpu_kernels, **SETTINGS), None,
                        log=lambda _m: None)[1]


def test_info_says_how_decode_steps_run(tiny_llama_dir, native_kernels, tmp_path):
    if native_kernels is None:
        pytest.skip("no native CPU kernels here")
    assert _info(tiny_llama_dir, "native").decode_path == "native-stack"
    assert _info(tiny_llama_dir, "torch").decode_path == "layers"
    qwen3 = _info(qwen3_copy(tiny_llama_dir, tmp_path / "qwen3"), "native")
    assert (qwen3.architecture, qwen3.decode_path) == ("Qwen3ForCausalLM", "layers")
