"""Multi-adapter decode: 16 distinct adapters vs no adapters vs PEFT mixed-batch generate.

Default model, float32, rank-16 LoRA on all seven linear modules of every layer. Same
prompts, same lengths, one process.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from common import prompt_ids
from engine_bench import engine_decode_tok_s, make_engine, transformers_decode_tok_s

REPEATS = 3
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft_adapters(model_dir: Path, out_root: Path, count: int, rank: int = 16,
                       targets=ALL_LINEAR, seed: int = 0) -> list[Path]:
    """Save `count` random PEFT LoRA adapters (lora_B non-zero) for the model in model_dir."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for i in range(count):
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets),
                            init_lora_weights=False, task_type="CAUSAL_LM")
        torch.manual_seed(seed + i)
        model = get_peft_model(base, config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.mul_(0.05)   # keep the deltas modest, like a trained adapter
        path = out_root / f"adapter-{i:03d}"
        model.save_pretrained(path)
        paths.append(path)
    return paths


def open_store(root: Path, model_dir: Path, max_lora_rank: int = 64):
    from loraplex.adapters_store.store import AdapterStore, StoreConfig
    from loraplex.server.engine.builder import base_spec_for
    from loraplex.server.engine.config import EngineConfig

    base = base_spec_for(EngineConfig(model_dir=model_dir))
    config = StoreConfig(max_lora_rank=max_lora_rank, allowed_register_roots=(root.parent,))
    return AdapterStore(root, config, base)


def register_all(store, paths: list[Path]) -> list[str]:
    names = []
    for path in paths:
        record = store.register_path(path.name, path)
        names.append(record.name)
    return names


@dataclass(frozen=True)
class LoraResult:
    batch: int
    no_adapter_tok_s: float
    adapters_tok_s: float
    peft_tok_s: float
    bf16_adapters_tok_s: float = 0.0      # the same 16 adapters stored in bfloat16 slots


def peft_mixed_model(model_dir: Path, paths: list[Path]):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, paths[0], adapter_name=paths[0].name)
    for path in paths[1:]:
        model.load_adapter(path, adapter_name=path.name)
    return model.eval()


def run_lora_bench(model_dir: Path, num_adapters: int = 16, new_tokens: int = 32,
                   prompt_len: int = 32, log=print) -> LoraResult:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = prompt_ids(tokenizer, num_adapters, prompt_len)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        log(f"  creating {num_adapters} rank-16 PEFT adapters ...")
        paths = make_peft_adapters(model_dir, tmp / "peft", num_adapters)
        store = open_store(tmp / "store", model_dir)
        names = register_all(store, paths)
        engine = make_engine(model_dir, store=store, max_loras=num_adapters)
        half = make_engine(model_dir, store=store, max_loras=num_adapters, adapter_dtype="bfloat16")
        for warm in (engine, half):
            engine_decode_tok_s(warm, prompts, 2, adapters=names)   # load all slots once
        base_tok_s = lora_tok_s = bf16_tok_s = 0.0
        for _ in range(REPEATS):   # interleaved, best of each: noise only ever slows a run down
            base_tok_s = max(base_tok_s, engine_decode_tok_s(engine, prompts, new_tokens))
            lora_tok_s = max(lora_tok_s, engine_decode_tok_s(engine, prompts, new_tokens, adapters=names))
            bf16_tok_s = max(bf16_tok_s, engine_decode_tok_s(half, prompts, new_tokens, adapters=names))
        log(f"  engine: no adapters {base_tok_s:.1f} tok/s, {num_adapters} adapters {lora_tok_s:.1f} tok/s, "
            f"{num_adapters} bfloat16 adapters (--adapter-dtype bfloat16) {bf16_tok_s:.1f} tok/s")
        del engine, half
        peft = peft_mixed_model(model_dir, paths)
        peft_tok_s = max(transformers_decode_tok_s(peft, prompts, new_tokens,
                                                   adapter_names=[p.name for p in paths])
                         for _ in range(2))
        log(f"  PEFT mixed-batch generate: {peft_tok_s:.1f} tok/s")
    return LoraResult(num_adapters, base_tok_s, lora_tok_s, peft_tok_s, bf16_tok_s)


def run_adapter_curve(model_dir: Path, counts=(1, 4, 16, 64), batch: int = 64, new_tokens: int = 16,
                      prompt_len: int = 32, log=print) -> list[tuple[int, float]]:
    """Decode throughput at a fixed batch as the number of distinct adapters grows (max_loras 64)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = prompt_ids(tokenizer, batch, prompt_len)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_random_adapters(model_dir, tmp / "peft", max(counts))
        store = open_store(tmp / "store", model_dir)
        names = register_all(store, paths)
        engine = make_engine(model_dir, store=store, max_loras=max(counts))
        base = max(engine_decode_tok_s(engine, prompts, new_tokens) for _ in range(REPEATS))
        results.append((0, base))
        log(f"  no adapters: {base:.1f} tok/s")
        for count in counts:
            adapters = [names[i % count] for i in range(batch)]
            engine_decode_tok_s(engine, prompts[:count], 2, adapters=adapters[:count])  # load slots
            tok_s = max(engine_decode_tok_s(engine, prompts, new_tokens, adapters=adapters)
                        for _ in range(REPEATS))
            log(f"  {count:3d} distinct adapters: {tok_s:.1f} tok/s")
            results.append((count, tok_s))
        store.close()
    return results


def model_shapes(model_dir: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """(num_layers, module name -> (in_features, out_features)) of the served base."""
    from loraplex.server.model.config import ModelConfig

    config = ModelConfig.from_dir(model_dir)
    return config.num_layers, config.module_shapes()


def write_random_adapter(path: Path, num_layers: int, shapes: dict[str, tuple[int, int]], rank: int,
                         targets, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> Path:
    """One PEFT-format LoRA directory with random A and B (B non-zero), as PEFT would save it."""
    import json

    from safetensors.torch import save_file

    tensors = {}
    for layer in range(num_layers):
        for module in targets:
            in_f, out_f = shapes[module]
            group = "self_attn" if module in ALL_LINEAR[:4] else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{group}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, in_f, generator=generator) * 0.02).to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(out_f, rank, generator=generator) * 0.02).to(dtype)
    path.mkdir(parents=True)
    save_file(tensors, path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(targets),
        "use_rslora": False, "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None}))
    return path


def make_random_adapters(model_dir: Path, out_root: Path, count: int, rank: int = 16,
                         targets=ALL_LINEAR, seed: int = 0) -> list[Path]:
    """`count` random float32 PEFT-format adapters written directly (fast)."""
    num_layers, shapes = model_shapes(model_dir)
    generator = torch.Generator().manual_seed(seed)
    return [write_random_adapter(out_root / f"adapter-{i:04d}", num_layers, shapes, rank, targets, generator)
            for i in range(count)]


def run_load_latency(model_dir: Path, ranks=(8, 64), repeats: int = 5, log=print) -> list[tuple[int, float, float, int]]:
    """Adapter load: disk -> host (read, sha256, parse) and host -> device slot, median ms."""
    import statistics
    import time as _time

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        engine = make_engine(model_dir)
        for rank in ranks:
            paths = make_random_adapters(model_dir, tmp / f"r{rank}", repeats, rank=rank, seed=rank)
            store = open_store(tmp / f"store-{rank}", model_dir)
            from loraplex.server.lora.manager import AdapterManager
            from loraplex.server.lora.slot_pool import SlotPool
            pool = SlotPool(engine.runner.model.lora_targets(), 2, 64, torch.float32, "cpu")
            disk_ms, slot_ms = [], []
            for path in paths:
                key = store.register_path(path.name, path).key
                started = _time.perf_counter()
                loaded = store.load(key)
                disk_ms.append((_time.perf_counter() - started) * 1e3)
                started = _time.perf_counter()
                pool.load(0, loaded)
                slot_ms.append((_time.perf_counter() - started) * 1e3)
            pool.detach()
            size = sum(p.stat().st_size for p in paths[0].iterdir())
            results.append((rank, statistics.median(disk_ms), statistics.median(slot_ms), size))
            log(f"  rank {rank}: disk->host {results[-1][1]:.1f} ms, host->slot {results[-1][2]:.1f} ms")
            store.close()
    return results
