"""Read HF safetensors checkpoints (single file or sharded) and build quantized projections.

Only safetensors are read (never pickle). Every linear goes through the layers factory, so it is
quantized at load time; q/k/v and gate/up are fused into one projection each.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from ..layers.base import QuantSpec
from ..layers.factory import build_fused_linear
from ..layers.proj import ProjLinear
from .config import ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Fused projections: (attribute, HF module prefix, HF sub-module names).
FUSED_PROJECTIONS = (
    ("qkv_proj", "self_attn", ("q_proj", "k_proj", "v_proj")),
    ("o_proj", "self_attn", ("o_proj",)),
    ("gate_up_proj", "mlp", ("gate_proj", "up_proj")),
    ("down_proj", "mlp", ("down_proj",)),
)
# Phi-3: the checkpoint (and so PEFT's adapters) hold qkv_proj and gate_up_proj as one module each;
# each is served as one projection with one LoRA sub-module, exactly as PEFT computes it.
CHECKPOINT_FUSED_PROJECTIONS = (
    ("qkv_proj", "self_attn", ("qkv_proj",)),
    ("o_proj", "self_attn", ("o_proj",)),
    ("gate_up_proj", "mlp", ("gate_up_proj",)),
    ("down_proj", "mlp", ("down_proj",)),
)


class CheckpointReader:
    """Lazy access to the tensors of a safetensors checkpoint directory (use as a context)."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self._file_of = _tensor_files(self.model_dir)      # tensor name -> file name
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self._handles.clear()
        self._stack.close()

    def has(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise ValueError(f"checkpoint {self.model_dir} has no tensor {name!r}; is it a "
                             "checkpoint of its config.json's architecture, saved by transformers?")
        file_name = self._file_of[name]
        if file_name not in self._handles:
            path = self.model_dir / file_name
            self._handles[file_name] = self._stack.enter_context(safe_open(str(path), framework="pt"))
        return self._handles[file_name].get_tensor(name)

    def get_optional(self, name: str) -> torch.Tensor | None:
        return self.get(name) if self.has(name) else None


def _tensor_files(model_dir: Path) -> dict[str, str]:
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no weight_map")
        missing = sorted({f for f in weight_map.values() if not (model_dir / f).is_file()})
        if missing:
            raise ValueError(f"{index} lists shard(s) that are missing: {', '.join(missing)}")
        return dict(weight_map)
    single = model_dir / SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt") as handle:
            return {name: SINGLE_FILE for name in handle.keys()}
    raise ValueError(f"{model_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}; loraplex reads only "
                     "safetensors checkpoints (re-save the model with save_pretrained)")


def load_projections(reader: CheckpointReader, config: ModelConfig, layer_idx: int,
                     spec: QuantSpec) -> dict[str, ProjLinear]:
    """The fused projections of one decoder layer, keyed by attribute name (four; two, the
    attention's, in a MoE layer)."""
    shapes = config.module_shapes()
    projections = {}
    layout = CHECKPOINT_FUSED_PROJECTIONS if config.fused_checkpoint else FUSED_PROJECTIONS
    for attr, module, sub_names in layout:
        if any(sub not in shapes for sub in sub_names):
            continue                      # a MoE layer's MLP is its experts (moe.py)
        prefix = f"model.layers.{layer_idx}.{module}."
        weights, biases = [], []
        for sub in sub_names:
            weight = reader.get(prefix + sub + ".weight")
            expected = shapes[sub][::-1]
            if tuple(weight.shape) != expected:
                raise ValueError(f"{prefix}{sub}.weight has shape {tuple(weight.shape)}, config.json "
                                 f"implies {expected}")
            weights.append(weight)
            biases.append(reader.get_optional(prefix + sub + ".bias"))
        base = build_fused_linear(weights, biases, spec)
        out_sizes = tuple(w.shape[0] for w in weights)
        projections[attr] = ProjLinear(base, layer_idx, sub_names, out_sizes)
    return projections


def load_dense(reader: CheckpointReader, name: str, spec: QuantSpec) -> torch.Tensor:
    """A non-quantized tensor (embeddings, norms, LM head) in the compute dtype on the device."""
    return reader.get(name).to(device=spec.device, dtype=spec.compute_dtype).contiguous()


def load_lm_head(reader: CheckpointReader, config: ModelConfig, embed: torch.Tensor,
                 spec: QuantSpec) -> torch.Tensor:
    """[vocab, hidden] LM head weight: the embedding when tied, else lm_head.weight."""
    if config.tie_word_embeddings:
        return embed
    if not reader.has("lm_head.weight"):
        raise ValueError(f"{reader.model_dir}: tie_word_embeddings is false but the checkpoint has "
                         "no lm_head.weight")
    return load_dense(reader, "lm_head.weight", spec)
