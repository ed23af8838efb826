"""Export a base model with one LoRA adapter merged in: the right way, or the lossy naive way.

Right way (`naive=False`): W' = W + scaling * B @ A in float32 on the float checkpoint; saved as
float. With a quantization backend, the merged float model is what the server quantizes at load
(`loraplex serve --model OUT --quantize BACKEND`); the choice is recorded in QUANT_FILE.

Naive way (`naive=True`, needs a backend): what "merge the LoRA into the 4-bit model" does —
dequantize the quantized base weight, add the delta, quantize again with the same backend. The
result is saved dequantized (float) so it can be evaluated exactly as it would be served.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ...adapters_store.types import ATTENTION_MODULES, LoadedAdapter
from ..layers.base import QuantSpec
from ..layers.factory import build_linear
from ..lora.fingerprint import base_spec_from_model_config
from ..model.config import ModelConfig
from ..model.loader import SINGLE_FILE, CheckpointReader, _tensor_files
from .adapter_dir import load_peft_dir

QUANT_FILE = "loraplex_quantization.json"
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja")


@dataclass(frozen=True)
class MergeResult:
    out_dir: Path
    merged_modules: int          # (layer, module) pairs that received a delta
    quantize: str                # "none" or the backend
    naive: bool


def hf_weight_name(layer_idx: int, module: str) -> str:
    parent = "self_attn" if module in ATTENTION_MODULES else "mlp"
    return f"model.layers.{layer_idx}.{parent}.{module}.weight"


def lora_delta(adapter: LoadedAdapter, layer_idx: int, module: str) -> torch.Tensor | None:
    """[out, in] float32 scaling * B @ A, or None when the adapter does not target the module."""
    pair = adapter.weights.get((layer_idx, module))
    if pair is None:
        return None
    lora_a, lora_b = pair                                         # [r, in], [out, r]
    return adapter.config.scaling * (lora_b.float() @ lora_a.float())


def merge_adapter(model_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path,
                  quantize: str = "none", naive: bool = False, hqq_group_size: int = 64) -> MergeResult:
    """Write a merged model (safetensors + config + tokenizer) to out_dir; see module docstring."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if naive and quantize == "none":
        raise ValueError("--naive merges into quantized weights: give --quantize BACKEND (e.g. bnb-nf4)")
    spec = QuantSpec(method=quantize, hqq_group_size=hqq_group_size)      # validates the name
    config = ModelConfig.from_dir(model_dir)
    adapter = load_peft_dir(adapter_dir, base_spec_from_model_config(config, "none"))
    tensors, merged = {}, 0
    with CheckpointReader(model_dir) as reader:
        for name in _tensor_files(model_dir):
            tensors[name] = reader.get(name)
        for layer_idx in range(config.num_layers):
            for module in config.module_shapes():
                name = hf_weight_name(layer_idx, module)
                delta = lora_delta(adapter, layer_idx, module)
                weight = tensors[name]
                if naive:
                    tensors[name] = _naive_merge(weight, delta, spec)
                elif delta is not None:
                    tensors[name] = (weight.float() + delta).to(weight.dtype)
                merged += delta is not None
    _write(model_dir, out_dir, tensors, quantize, naive, Path(adapter_dir).name)
    return MergeResult(out_dir=out_dir, merged_modules=merged, quantize=quantize, naive=naive)


def _naive_merge(weight: torch.Tensor, delta: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """dequant(quant(dequant(quant(W)) + delta)) in W's dtype; untargeted W: dequant(quant(W))."""
    stored = build_linear(weight.float(), None, spec).dequantized_weight().float()   # [out, in]
    if delta is None:
        return stored.to(weight.dtype)
    requantized = build_linear(stored + delta, None, spec).dequantized_weight()
    return requantized.to(weight.dtype)


def _write(model_dir: Path, out_dir: Path, tensors: dict[str, torch.Tensor], quantize: str,
           naive: bool, adapter_name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with safe_open(str(_first_file(model_dir)), framework="pt") as handle:
        metadata = handle.metadata() or {"format": "pt"}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / SINGLE_FILE), metadata=metadata)
    for name in COPIED_FILES:
        if (model_dir / name).is_file():
            shutil.copy(model_dir / name, out_dir / name)
    if quantize != "none":
        record = {"quantize": quantize, "naive": naive, "adapter": adapter_name,
                  "serve_with": "--quantize none" if naive else f"--quantize {quantize}",
                  "note": ("weights were merged into the quantized base and saved dequantized (lossy "
                           "path, for comparison)") if naive else
                          "merged in float; quantize at load with the recorded backend"}
        (out_dir / QUANT_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _first_file(model_dir: Path) -> Path:
    return model_dir / sorted(set(_tensor_files(model_dir).values()))[0]
