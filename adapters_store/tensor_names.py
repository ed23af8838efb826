"""PEFT LoRA tensor names <-> (layer_idx, module, A|B|M).

M is DoRA's magnitude vector (`lora_magnitude_vector`, PEFT saves it without `.weight`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import AdapterValidationError
from .types import ATTENTION_MODULES, MLP_MODULES

_KEY_RE = re.compile(r"(?:base_model\.model\.)?model\.layers\.(0|[1-9][0-9]{0,5})\.(self_attn|mlp)\.([A-Za-z0-9_]+)"
                     r"\.(?:lora_([AB])(?:\.default)?\.weight|lora_(magnitude)_vector(?:\.default)?(?:\.weight)?)", re.ASCII)
_PARENT = {**{m: "self_attn" for m in ATTENTION_MODULES}, **{m: "mlp" for m in MLP_MODULES}}


@dataclass(frozen=True)
class LoraTensorName:
    layer_idx: int
    parent: str                  # "self_attn" | "mlp"
    module: str                  # e.g. "q_proj"
    factor: str                  # "A" | "B" | "M" (DoRA magnitude, [out_features])


def parse_tensor_name(name: str) -> LoraTensorName:
    """Parse `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A[.default].weight`."""
    match = _KEY_RE.fullmatch(name)
    if match is None:
        if "embed_tokens" in name or "lm_head" in name:
            raise AdapterValidationError("embedding_target", f"tensor {name!r} adapts an embedding / lm_head; "
                                         f"only decoder linear layers can carry LoRA weights here")
        raise AdapterValidationError("tensor_name", f"tensor {name!r} is not a PEFT LoRA weight of a decoder "
                                     f"layer (expected base_model.model.model.layers.<i>.<self_attn|mlp>."
                                     f"<module>.lora_<A|B>.weight)")
    layer, parent, module, factor, magnitude = match.groups()
    factor = "M" if magnitude else factor
    if _PARENT.get(module, parent) != parent:
        raise AdapterValidationError("tensor_name", f"tensor {name!r}: {module} belongs under "
                                     f"{_PARENT[module]}, not {parent}")
    return LoraTensorName(int(layer), parent, module, factor)
