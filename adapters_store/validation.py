"""Validate a PEFT LoRA adapter (config + safetensors bytes) before anything is registered.

Each rule raises AdapterValidationError(rule, message); see docs/adapter-store.md for the list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_safetensors

from .config import StoreConfig
from .errors import AdapterValidationError
from .peft_config import ParsedConfig, parse_config
from .safetensors_header import TensorEntry, parse_header
from .expert_tensors import (EXPERT_TARGET_PREFIX, ExpertTensorName, check_expert_shape, check_experts_complete,
                             expert_param, parse_expert_tensor_name)
from .tensor_names import LoraTensorName, parse_tensor_name
from .types import LORA_TARGET_MODULES, BaseSpec, LoraConfigInfo
from .vocab_tensors import (VOCAB_MODULES, adapter_vocab_size, check_vocab_complete, check_vocab_entry,
                            parse_vocab_tensor_name)

ALLOWED_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
# Bound on scaling * ||B||_F * ||A||_F, an upper bound of the delta's gain |delta(x)| / |x|.
# Trained adapters stay far below 1e3 (random test adapters of 2k-wide models near 1e5).
MAX_DELTA_GAIN = 1e6


@dataclass(frozen=True)
class ValidatedAdapter:
    """What validation learned: the serving config and the weights' dtype name."""

    config: LoraConfigInfo
    dtype: str
    num_tensors: int
    vocab_size: int = 0          # V' of a resized vocabulary (modules_to_save tables); 0: the base's


def validate_adapter(config_bytes: bytes, weights_bytes: bytes, base: BaseSpec, limits: StoreConfig,
                     allow_base_mismatch: bool = False) -> ValidatedAdapter:
    """Run every rule; raises AdapterValidationError on the first broken one."""
    total = len(config_bytes) + len(weights_bytes)
    if total > limits.max_adapter_bytes:
        raise AdapterValidationError("size_limit", f"the adapter is {total} bytes, above the limit of "
                                     f"{limits.max_adapter_bytes}; raise --max-adapter-bytes or use a smaller rank")
    if len(config_bytes) > limits.max_config_bytes:
        raise AdapterValidationError("size_limit", f"adapter_config.json is {len(config_bytes)} bytes, above "
                                     f"{limits.max_config_bytes}")
    entries = parse_header(weights_bytes, limits.max_header_bytes)
    parsed = parse_config(config_bytes, base, limits.max_lora_rank, allow_base_mismatch)
    vocab = {entry.name: name for entry in entries if (name := parse_vocab_tensor_name(entry.name)) is not None}
    # a missing half is named before any shape: it is what the uploader has to fix first, and
    # the shapes depend on the served base's vocabulary
    check_vocab_complete(vocab, parsed.vocab_lora, parsed.modules_to_save)
    rows = {}
    for entry in entries:
        if entry.name in vocab:
            _check_dtype(entry)
            rows[entry.name] = (vocab[entry.name], check_vocab_entry(
                entry.name, vocab[entry.name], entry.shape, parsed.rank, base, parsed.vocab_lora,
                parsed.modules_to_save))
    vocab_size = adapter_vocab_size(rows, parsed.modules_to_save, base.vocab_size) if rows else base.vocab_size
    experts = check_expert_entries(entries, parsed, base)
    names = {entry.name: _check_entry(entry, parsed, base) for entry in entries
             if entry.name not in vocab and entry.name not in experts}
    modules = _check_pairs(names, parsed.use_dora, allow_empty=bool(vocab) or bool(experts))
    tensors = _load_tensors(weights_bytes)
    _check_finite(tensors)
    _check_scaling(parsed, {name: tensor for name, tensor in tensors.items() if name in names})
    check_expert_scaling(parsed.scaling, experts, tensors)
    dtypes = sorted({ALLOWED_DTYPES[entry.dtype] for entry in entries})
    targets = tuple(m for m in LORA_TARGET_MODULES if m in modules) + tuple(
        m for m in VOCAB_MODULES if m in parsed.vocab_lora) + tuple(
        EXPERT_TARGET_PREFIX + p for p in parsed.target_parameters)
    info = LoraConfigInfo(rank=parsed.rank, lora_alpha=parsed.lora_alpha, use_rslora=parsed.use_rslora,
                          target_modules=targets,
                          base_model=parsed.base_model, base_fingerprint=parsed.base_fingerprint)
    return ValidatedAdapter(config=info, dtype=",".join(dtypes), num_tensors=len(entries),
                            vocab_size=vocab_size if vocab_size != base.vocab_size else 0)


def _check_dtype(entry: TensorEntry) -> None:
    if entry.dtype not in ALLOWED_DTYPES:
        raise AdapterValidationError("dtype", f"tensor {entry.name!r} is {entry.dtype}; adapter weights must be "
                                     f"float32, float16 or bfloat16")


def _check_entry(entry: TensorEntry, parsed: ParsedConfig, base: BaseSpec) -> LoraTensorName:
    name = parse_tensor_name(entry.name)
    _check_dtype(entry)
    if name.layer_idx >= base.num_layers:
        raise AdapterValidationError("layer_range", f"tensor {entry.name!r} names layer {name.layer_idx} but the "
                                     f"served base has {base.num_layers} layers (0..{base.num_layers - 1})")
    if name.module not in base.module_shapes:
        raise AdapterValidationError("unknown_target", f"tensor {entry.name!r}: the served base has no "
                                     f"{name.module} (modules: {sorted(base.module_shapes)})")
    if not parsed.targets_module(name.layer_idx, name.parent, name.module):
        raise AdapterValidationError("target_mismatch", f"tensor {entry.name!r} adapts {name.module}, which "
                                     f"adapter_config.json target_modules does not list")
    in_features, out_features = base.module_shapes[name.module]
    if name.factor == "M":
        return _check_magnitude(entry, name, parsed, out_features)
    expected = (parsed.rank, in_features) if name.factor == "A" else (out_features, parsed.rank)
    if entry.shape != expected:
        layout = "[r, in_features]" if name.factor == "A" else "[out_features, r]"
        raise AdapterValidationError("shape", f"tensor {entry.name!r} has shape {list(entry.shape)}, expected "
                                     f"{list(expected)} ({layout} with r={parsed.rank}); the adapter was trained "
                                     f"for a different base or rank")
    return name


def _check_magnitude(entry: TensorEntry, name: LoraTensorName, parsed: ParsedConfig,
                     out_features: int) -> LoraTensorName:
    """DoRA's magnitude vector: only with use_dora, shape [out_features]."""
    if not parsed.use_dora:
        raise AdapterValidationError("dora_magnitude", f"tensor {entry.name!r} is a DoRA magnitude vector but "
                                     f"adapter_config.json has use_dora=false; the adapter is inconsistent")
    if entry.shape != (out_features,):
        raise AdapterValidationError("shape", f"tensor {entry.name!r} has shape {list(entry.shape)}, expected "
                                     f"[{out_features}] (DoRA magnitude: one value per output feature of "
                                     f"{name.module}); the adapter was trained for a different base")
    return name


def _check_pairs(names: dict[str, LoraTensorName], use_dora: bool = False, allow_empty: bool = False) -> set[str]:
    """Every module has lora_A and lora_B (and, with DoRA, its magnitude vector)."""
    if not names and not allow_empty:
        raise AdapterValidationError("no_tensors", "the weights file holds no LoRA tensors")
    seen: dict[tuple[int, str], set[str]] = {}
    for tensor_name, name in names.items():
        factors = seen.setdefault((name.layer_idx, name.module), set())
        if name.factor in factors:
            raise AdapterValidationError("duplicate_tensor", f"layer {name.layer_idx} {name.module} has two "
                                         f"lora_{name.factor} tensors (one is {tensor_name!r})")
        factors.add(name.factor)
    required = {"A", "B", "M"} if use_dora else {"A", "B"}
    for (layer, module), factors in sorted(seen.items()):
        if factors != required:
            missing = sorted(required - factors)[0]
            if missing == "M":
                raise AdapterValidationError("dora_magnitude", f"layer {layer} {module} has no "
                                             f"lora_magnitude_vector; a DoRA adapter (use_dora=true) needs one "
                                             f"for every adapted module")
            raise AdapterValidationError("missing_pair", f"layer {layer} {module} has no lora_{missing} weight; "
                                         f"every lora_A needs its lora_B and vice versa")
    return {module for _, module in seen}


def _check_finite(tensors: dict[str, torch.Tensor]) -> None:
    for name, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise AdapterValidationError("non_finite", f"tensor {name!r} contains NaN or Inf values; the adapter "
                                         f"is broken (check training for divergence)")


def _load_tensors(weights_bytes: bytes) -> dict[str, torch.Tensor]:
    """The tensors; any loader failure the header checks missed is a validation error, not a crash."""
    try:
        return load_safetensors(weights_bytes)
    except Exception as error:  # noqa: BLE001 - the Rust loader raises its own SafetensorError
        raise AdapterValidationError("header_json", f"the safetensors loader refused the file ({error}); "
                                     f"the file is not a valid safetensors file") from None


def _check_scaling(parsed: ParsedConfig, tensors: dict[str, torch.Tensor]) -> None:
    """The effective scale must fit float32 and keep every module's delta gain bounded."""
    scaling = parsed.scaling
    formula = "lora_alpha / sqrt(r)" if parsed.use_rslora else "lora_alpha / r"
    if not math.isfinite(scaling) or abs(scaling) > FLOAT32_MAX:
        raise AdapterValidationError("scaling", f"the LoRA scale {formula} = {scaling:g} does not fit float32; "
                                     f"lora_alpha={parsed.lora_alpha:g} is far outside any trained adapter's range")
    norms: dict[tuple[int, str], dict[str, float]] = {}
    for tensor_name, tensor in tensors.items():
        name = parse_tensor_name(tensor_name)
        norms.setdefault((name.layer_idx, name.module), {})[name.factor] = float(
            torch.linalg.vector_norm(tensor.to(torch.float64)))
    for (layer, module), pair in sorted(norms.items()):
        if "A" not in pair or "B" not in pair:
            continue
        gain = abs(scaling) * pair["A"] * pair["B"]
        if not gain <= MAX_DELTA_GAIN:
            raise AdapterValidationError("scaling", f"layer {layer} {module}: scale ({formula} = {scaling:g}) x "
                                         f"|B| x |A| = {gain:.3g} exceeds {MAX_DELTA_GAIN:g}; the delta would "
                                         f"overflow or swamp the base output. Check lora_alpha and the weights")


def check_expert_entries(entries: list[TensorEntry], parsed: ParsedConfig, base: BaseSpec
                         ) -> dict[str, ExpertTensorName]:
    """The MoE expert tensors (PEFT target_parameters), each checked: dtype, layer, which targeted
    parameter, shape, no duplicates; then every targeted layer/parameter has A and B."""
    experts: dict[str, ExpertTensorName] = {}
    found: set[tuple[int, str, str]] = set()
    for entry in entries:
        name = parse_expert_tensor_name(entry.name)
        if name is None:
            continue
        _check_dtype(entry)
        if name.layer_idx >= base.num_layers:
            raise AdapterValidationError("layer_range", f"tensor {entry.name!r} names layer {name.layer_idx} but "
                                         f"the served base has {base.num_layers} layers")
        param = expert_param(name, parsed.target_parameters, entry.name)
        check_expert_shape(entry.name, entry.shape, name.factor, param, parsed.expert_ranks.get(param, parsed.rank),
                           base)
        if (name.layer_idx, param, name.factor) in found:
            raise AdapterValidationError("duplicate_tensor", f"layer {name.layer_idx} experts {param} has two "
                                         f"lora_{name.factor} tensors (one is {entry.name!r})")
        found.add((name.layer_idx, param, name.factor))
        experts[entry.name] = name
    if parsed.target_parameters:
        check_experts_complete(found, parsed.target_parameters, base.num_layers)
    return experts


def check_expert_scaling(scaling: float, experts: dict[str, ExpertTensorName],
                         tensors: dict[str, torch.Tensor]) -> None:
    """scale x |B| x |A| over the whole expert stacks bounds every expert's delta gain."""
    pairs: dict[tuple[int, int], dict[str, float]] = {}
    for tensor_name, name in experts.items():
        pairs.setdefault((name.layer_idx, name.depth), {})[name.factor] = float(
            torch.linalg.vector_norm(tensors[tensor_name].to(torch.float64)))
    for (layer, depth), pair in sorted(pairs.items()):
        gain = abs(scaling) * pair["A"] * pair["B"]
        if not gain <= MAX_DELTA_GAIN:
            raise AdapterValidationError("scaling", f"layer {layer} experts: scale {scaling:g} x |B| x |A| = "
                                         f"{gain:.3g} exceeds {MAX_DELTA_GAIN:g}; the delta would overflow or "
                                         f"swamp the base output. Check lora_alpha and the weights")
