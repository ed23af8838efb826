"""Decode cost of each adapter kind against plain LoRA, batch 16 (`python bench/adapter_kinds_bench.py`).

Default model, float32, 4 adapters of each kind x 4 rows = 16 decoding rows per step; rank 16 on
all seven linear modules, plus: DoRA magnitudes; LoRA on embed_tokens + lm_head; or
modules_to_save embed_tokens + lm_head (two 49152 x 576 tables per adapter); or the same with a
resized vocabulary (64 added tokens: two 49216 x 576 tables and the adapter's own tokenizer;
every step with such rows computes 49216-wide logits). The configurations
run interleaved in one process, best of REPEATS each (noise only ever slows a run down); report
ratios to plain LoRA, not absolute numbers, on a shared machine.

DoRA decode steps run in the fused native decode stack (one call for all layers); the row
"DoRA, layer-by-layer path" runs the same DoRA rows with the stack switched off, which is how
they ran before the stack applied DoRA's factors. `python bench/adapter_kinds_bench.py DoRA`
runs only plain LoRA, no adapter and the named kinds.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common import prompt_ids
from engine_bench import engine_decode_tok_s, make_engine
from lora_bench import ALL_LINEAR, make_random_adapters, open_store

REPEATS, NUM_ADAPTERS, ROWS, NEW_TOKENS = 3, 4, 16, 16
RESIZED, ADDED_TOKENS = "modules_to_save, resized vocabulary", 64
EMBED, LM_HEAD = "base_model.model.model.embed_tokens", "base_model.model.lm_head"


def add_kind(path: Path, kind: str, vocab: int, hidden: int, generator: torch.Generator) -> Path:
    """Turn a plain random adapter directory into one of `kind` (in place)."""
    tensors = load_file(path / "adapter_model.safetensors")
    config = json.loads((path / "adapter_config.json").read_text())
    rank = config["r"]
    rand = lambda *shape: torch.randn(*shape, generator=generator) * 0.02      # noqa: E731
    if kind == "DoRA":
        config["use_dora"] = True
        for name in [n for n in tensors if n.endswith("lora_B.weight")]:
            out_features = tensors[name].shape[0]
            tensors[name.replace("lora_B.weight", "lora_magnitude_vector")] = torch.rand(
                out_features, generator=generator) + 0.5
    elif kind == "embed+lm_head LoRA":
        config["target_modules"] = ALL_LINEAR + ["embed_tokens", "lm_head"]
        tensors.update({f"{EMBED}.lora_embedding_A": rand(rank, vocab), f"{EMBED}.lora_embedding_B": rand(hidden, rank),
                        f"{LM_HEAD}.lora_A.weight": rand(rank, hidden), f"{LM_HEAD}.lora_B.weight": rand(vocab, rank)})
    elif kind == "modules_to_save embed+lm_head":
        config["modules_to_save"] = ["embed_tokens", "lm_head"]
        tensors.update({f"{EMBED}.weight": rand(vocab, hidden), f"{LM_HEAD}.weight": rand(vocab, hidden)})
    elif kind == RESIZED:
        config["modules_to_save"] = ["embed_tokens", "lm_head"]
        wide = vocab + ADDED_TOKENS
        tensors.update({f"{EMBED}.weight": rand(wide, hidden), f"{LM_HEAD}.weight": rand(wide, hidden)})
        add_tokenizer(path, ADDED_TOKENS)
    save_file(tensors, path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def add_tokenizer(path: Path, num_added: int) -> None:
    """Save the default model's tokenizer plus `num_added` tokens beside the adapter (its own tokenizer)."""
    from transformers import AutoTokenizer

    from loraplex.server.model.default_model import ensure_default_model

    tokenizer = AutoTokenizer.from_pretrained(ensure_default_model(log=lambda _m: None))
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(num_added)])
    tokenizer.save_pretrained(path)


def main() -> int:
    from transformers import AutoTokenizer

    from loraplex.server.engine.adapter_tokenizers import base_tokens
    from loraplex.server.model.config import ModelConfig
    from loraplex.server.model.default_model import ensure_default_model

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    model_dir = ensure_default_model(log=print)
    config = ModelConfig.from_dir(model_dir)
    prompts = prompt_ids(AutoTokenizer.from_pretrained(model_dir), ROWS, 32)
    kinds = ["plain LoRA", "DoRA", "embed+lm_head LoRA", "modules_to_save embed+lm_head", RESIZED]
    kinds = [k for k in kinds if k == "plain LoRA" or not sys.argv[1:] or k in sys.argv[1:]]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = open_store(tmp / "store", model_dir, max_lora_rank=16)
        store.set_base_tokens(base_tokens(AutoTokenizer.from_pretrained(model_dir)))   # resized vocabularies
        generator = torch.Generator().manual_seed(0)
        names: dict[str, list[str]] = {}
        for k, kind in enumerate(kinds):
            paths = make_random_adapters(model_dir, tmp / f"kind{k}", NUM_ADAPTERS, seed=k)
            names[kind] = [store.register_path(p.name + f"-k{k}", add_kind(p, kind, config.vocab_size,
                                                                          config.hidden_size, generator)).name
                           for p in paths]
        engine = make_engine(model_dir, store=store, max_loras=NUM_ADAPTERS)
        rows = {kind: [names[kind][i % NUM_ADAPTERS] for i in range(ROWS)] for kind in kinds}
        best = {"no adapter": 0.0, **{kind: 0.0 for kind in kinds}}
        model, layer_path = engine.runner.model, "DoRA, layer-by-layer path"
        if "DoRA" in kinds and model.decode_stack is not None:
            best[layer_path] = 0.0
        for _ in range(REPEATS):
            best["no adapter"] = max(best["no adapter"], engine_decode_tok_s(engine, prompts, NEW_TOKENS))
            for kind in kinds:
                best[kind] = max(best[kind], engine_decode_tok_s(engine, prompts, NEW_TOKENS, adapters=rows[kind]))
                print(f"  {kind}: {best[kind]:.1f} tok/s", flush=True)
            if layer_path in best:
                stack, model.decode_stack = model.decode_stack, None
                best[layer_path] = max(best[layer_path], engine_decode_tok_s(engine, prompts, NEW_TOKENS,
                                                                             adapters=rows["DoRA"]))
                model.decode_stack = stack
                print(f"  {layer_path}: {best[layer_path]:.1f} tok/s", flush=True)
        store.close()
    plain = best["plain LoRA"]
    print("| rows use | decode tok/s | vs plain LoRA |\n|---|---:|---:|")
    for kind, tok_s in best.items():
        print(f"| {kind} | {tok_s:.1f} | {tok_s / plain:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
