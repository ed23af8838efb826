"""Qwen3-MoE decode at the default model's size: base, attention adapters, expert adapters.

No Qwen3-MoE checkpoint fits this machine (the smallest, 30B-A3B, is ~60 GB in bf16), so the
MoE engine serves a twin of the default model: its attention, norms and embeddings, and each
layer's MLP split into 8 experts of half its width (expert e = half e % 2 of the dense MLP, top-2
routing, a random router): the same active MLP FLOPs per token as the dense model, 4x its MLP
weights. Adapters are random rank-16 PEFT files: one on q/k/v/o only, one on q/k/v/o plus the
experts (target_parameters). Engines run in one process, alternating, on the same prompts; read
the ratios on a shared machine.

    .venv/bin/python bench/moe_decode.py [--batches 1 8] [--tokens 24] [--rounds 3]
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
from lora_bench import open_store  # noqa: E402

EXPERTS, TOP_K, RANK = 8, 2, 16


def moe_twin(model_dir: Path, out: Path) -> Path:
    """The default model as a Qwen3-MoE checkpoint (Hub per-expert layout), see the docstring."""
    for name in model_dir.iterdir():
        if name.is_file() and name.name not in ("config.json", "model.safetensors"):
            shutil.copy(name, out / name.name)
    config = json.loads((model_dir / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    half = config["intermediate_size"] // 2
    config.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", head_dim=head_dim,
                  use_sliding_window=False, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                  moe_intermediate_size=half, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    (out / "config.json").write_text(json.dumps(config))
    dense, tensors = load_file(model_dir / "model.safetensors"), {}
    gen = torch.Generator().manual_seed(0)
    for name, tensor in dense.items():
        if ".mlp." not in name:
            tensors[name] = tensor
    for layer in range(config["num_hidden_layers"]):
        mlp = f"model.layers.{layer}.mlp."
        for e in range(EXPERTS):
            cols = slice((e % 2) * half, (e % 2 + 1) * half)
            tensors[f"{mlp}experts.{e}.gate_proj.weight"] = dense[mlp + "gate_proj.weight"][cols].clone()
            tensors[f"{mlp}experts.{e}.up_proj.weight"] = dense[mlp + "up_proj.weight"][cols].clone()
            tensors[f"{mlp}experts.{e}.down_proj.weight"] = dense[mlp + "down_proj.weight"][:, cols].clone()
        tensors[mlp + "gate.weight"] = torch.randn(EXPERTS, config["hidden_size"], generator=gen) * 0.5
        for norm in ("q_norm", "k_norm"):
            tensors[f"model.layers.{layer}.self_attn.{norm}.weight"] = torch.ones(head_dim)
    save_file(tensors, out / "model.safetensors")
    return out


def write_adapter(path: Path, config: dict, experts: bool) -> Path:
    """A random rank-16 PEFT adapter on q/k/v/o (and, with experts, gate_up_proj and down_proj)."""
    gen = torch.Generator().manual_seed(1)
    hidden, heads, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim, inter = config["head_dim"], config["moe_intermediate_size"]
    shapes = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv * head_dim),
              "v_proj": (hidden, kv * head_dim), "o_proj": (heads * head_dim, hidden)}
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module, (fan_in, fan_out) in shapes.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}."
            tensors[prefix + "lora_A.weight"] = torch.randn(RANK, fan_in, generator=gen) * 0.01
            tensors[prefix + "lora_B.weight"] = torch.randn(fan_out, RANK, generator=gen) * 0.01
        if experts:   # outermost wrapper: down_proj; base_layer: gate_up_proj (PEFT's nesting)
            prefix = f"base_model.model.model.layers.{layer}.mlp.experts."
            for infix, (fan_in, fan_out) in (("", (inter, hidden)), ("base_layer.", (hidden, 2 * inter))):
                tensors[prefix + infix + "lora_A.weight"] = torch.randn(RANK * EXPERTS, fan_in, generator=gen) * 0.01
                tensors[prefix + infix + "lora_B.weight"] = torch.randn(fan_out, RANK * EXPERTS, generator=gen) * 0.01
    path.mkdir()
    save_file(tensors, path / "adapter_model.safetensors")
    peft = {"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "target_modules": list(shapes)}
    if experts:
        peft["target_parameters"] = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    (path / "adapter_config.json").write_text(json.dumps(peft))
    return path


def main(argv: list[str] | None = None) -> int:
    from loraplex.server.model.default_model import ensure_default_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    llama_dir = ensure_default_model(log=lambda _m: None)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "moe").mkdir()
        moe_dir = moe_twin(llama_dir, root / "moe")
        config = json.loads((moe_dir / "config.json").read_text())
        store = open_store(root / "adapters" / "store", moe_dir, max_lora_rank=RANK)
        for name, experts in (("attn", False), ("experts", True)):
            store.register_path(name, write_adapter(root / "adapters" / name, config, experts))
        batch_max = max(args.batches)
        engines = {"llama": make_engine(llama_dir, max_num_seqs=batch_max),
                   "moe": make_engine(moe_dir, max_num_seqs=batch_max, store=store, max_loras=2)}
        runs = {"llama": ("llama", None), "moe": ("moe", None), "moe+attn": ("moe", "attn"),
                "moe+experts": ("moe", "experts")}
        for batch in args.batches:
            prompts = prompt_ids(engines["llama"].tokenizer, batch, 64)
            rates: dict[str, list[float]] = {name: [] for name in runs}
            for _ in range(args.rounds):
                for name, (engine, adapter) in runs.items():
                    rates[name].append(engine_decode_tok_s(engines[engine], prompts, args.tokens, [adapter] * batch))
            medians = {name: statistics.median(r) for name, r in rates.items()}
            print(f"batch {batch:3d}: " + ", ".join(f"{name} {rate:.1f} tok/s ({rate / medians['llama']:.2f}x)"
                                                   for name, rate in medians.items()), flush=True)
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
