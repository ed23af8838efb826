"""Read a PEFT adapter directory into a LoadedAdapter, with the store's validation rules."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from ...adapters_store.config import StoreConfig
from ...adapters_store.loader import build_loaded_adapter
from ...adapters_store.types import BaseSpec, LoadedAdapter
from ...adapters_store.validation import validate_adapter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def load_peft_dir(path: str | Path, base: BaseSpec, max_lora_rank: int = 256,
                  dtype: torch.dtype = torch.float32) -> LoadedAdapter:
    """A PEFT `save_pretrained` directory -> LoadedAdapter (key = the directory name).

    Runs the same validation as an upload (shapes, targets, base fingerprint), so a tool never
    accepts an adapter the server would refuse.
    """
    path = Path(path)
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_file.is_file() or not weights_file.is_file():
        raise ValueError(f"{path} is not a PEFT adapter directory: it needs {CONFIG_FILE} and "
                         f"{WEIGHTS_FILE} (as written by PeftModel.save_pretrained)")
    config_bytes, weights_bytes = config_file.read_bytes(), weights_file.read_bytes()
    limits = StoreConfig(max_lora_rank=max_lora_rank, max_adapter_bytes=max(len(weights_bytes) * 2, 1 << 20))
    validated = validate_adapter(config_bytes, weights_bytes, base, limits)
    return build_loaded_adapter(path.name, validated.config, load_safetensors(weights_bytes), dtype)
