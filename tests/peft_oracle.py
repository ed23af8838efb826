"""PEFT as the oracle of the default-model integration tests: random adapters saved in PEFT's
format, and PEFT's own mixed-batch greedy generation (`adapter_names`)."""

from __future__ import annotations

from pathlib import Path

import torch


def save_random_adapters(model_dir: Path, root: Path, configs: dict[str, dict], first_seed: int) -> dict[str, Path]:
    """One PEFT adapter per name (LoraConfig keyword arguments), random A and B (B scaled by 0.2
    so the deltas matter without swamping the base), saved under root/name; their paths."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    paths = {}
    for i, (name, kwargs) in enumerate(configs.items()):
        torch.manual_seed(first_seed + i)
        model = get_peft_model(base, LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **kwargs))
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if "lora_B" in pname:
                    param.mul_(0.2)
        model.save_pretrained(root / name)
        paths[name] = root / name
        base = model.unload()
    return paths


def mixed_batch_generate(model, adapter_dirs: dict[str, Path], prompts: list[list[int]], rows: list[str | None],
                         new_tokens: int) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy tokens and raw logits [rows, steps, vocab] of one PEFT batch in which row i uses
    adapter rows[i] (None: the base), never stopping at EOS (like ignore_eos)."""
    from peft import PeftModel

    names = list(adapter_dirs)
    peft = PeftModel.from_pretrained(model, adapter_dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(adapter_dirs[name], adapter_name=name)
    peft.eval()
    peft.generation_config.eos_token_id = None
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        out = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                            max_new_tokens=new_tokens, pad_token_id=0, output_logits=True,
                            return_dict_in_generate=True, adapter_names=[row or "__base__" for row in rows])
    return out.sequences[:, ids.shape[1]:].tolist(), torch.stack(out.logits, dim=1)


def registered_store(model_dir: Path, method: str, adapter_dirs: dict[str, Path], store_dir: Path):
    """An AdapterStore for the served base (model_dir under `method`) with every adapter
    directory registered under its name."""
    from loraplex.adapters_store.config import StoreConfig
    from loraplex.adapters_store.store import AdapterStore
    from loraplex.server.engine.builder import base_spec_for
    from loraplex.server.engine.config import EngineConfig

    root = next(iter(adapter_dirs.values())).parent
    base = base_spec_for(EngineConfig.from_settings(model_dir, method=method))
    store = AdapterStore(store_dir, StoreConfig(allowed_register_roots=(root,)), base)
    for name, path in adapter_dirs.items():
        store.register_path(name, path)
    return store
