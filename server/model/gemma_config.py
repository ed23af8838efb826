"""What a Gemma 2 / Gemma 3 (text) config adds to the Llama-family fields, read and validated.

Gemma layers alternate sliding-window ("sliding_attention") and global ("full_attention")
attention, per `layer_types` (older config.json files: Gemma 2 every other layer, Gemma 3
`sliding_window_pattern`, five sliding then one global). Queries are scaled by
`query_pre_attn_scalar ** -0.5`, not head_dim's. Gemma 2 soft-caps attention scores and the
final logits (`cap * tanh(x / cap)`); Gemma 3 normalises q and k per head and gives sliding
layers their own rotary base (`rope_local_base_freq`, or `rope_parameters["sliding_attention"]`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .rope_config import RopeConfig

GEMMA_ARCHITECTURES = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
GEMMA_ACTIVATIONS = ("gelu_pytorch_tanh",)
_LAYER_TYPES = ("sliding_attention", "full_attention")
_DEFAULT_PATTERN = {"Gemma2ForCausalLM": 2, "Gemma3ForCausalLM": 6}   # transformers' defaults
_DEFAULT_GLOBAL_THETA = {"Gemma2ForCausalLM": 10000.0, "Gemma3ForCausalLM": 1_000_000.0}

RopeParser = Callable[[dict[str, Any], str], RopeConfig]


@dataclass(frozen=True)
class GemmaSpec:
    """Gemma's per-model extras; ModelConfig.rope is `global_rope`."""

    version: int                             # 2 or 3
    layer_windows: tuple[int | None, ...]    # per layer: its sliding window, None = global attention
    query_scale: float                       # query_pre_attn_scalar ** -0.5
    attn_softcap: float | None               # Gemma 2: scores -> cap * tanh(scores / cap)
    final_softcap: float | None              # logits -> cap * tanh(logits / cap)
    global_rope: RopeConfig
    local_rope: "RopeConfig"                 # sliding layers' rotary (Gemma 2: the global one)
    qk_norm: bool                            # Gemma 3: (1 + w) RMSNorm over each q and k head


def gemma_spec(raw: dict[str, Any], architecture: str, source: str, parse_rope: RopeParser) -> GemmaSpec:
    """Read the Gemma fields of a config.json dict; ValueError naming what is unsupported."""
    act = raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in GEMMA_ACTIVATIONS:
        raise ValueError(f"{source}: hidden_activation={act!r} is not supported for {architecture} "
                         f"(only {', '.join(GEMMA_ACTIVATIONS)})")
    if raw.get("use_bidirectional_attention"):
        raise ValueError(f"{source}: use_bidirectional_attention=true (an embedding model) is not supported; "
                         "loraplex serves causal language models")
    version = 2 if architecture == "Gemma2ForCausalLM" else 3
    window = raw.get("sliding_window")
    windows = tuple(int(window) if kind == "sliding_attention" and window else None
                    for kind in _layer_types(raw, architecture, source))
    global_rope = parse_rope(_rope_view(raw, "full_attention", architecture), source)
    local_rope = parse_rope(_rope_view(raw, "sliding_attention", architecture), source) if version == 3 else global_rope
    return GemmaSpec(version=version, layer_windows=windows,
                     query_scale=float(raw.get("query_pre_attn_scalar", 256)) ** -0.5,
                     attn_softcap=_cap(raw, "attn_logit_softcapping", source),
                     final_softcap=_cap(raw, "final_logit_softcapping", source),
                     global_rope=global_rope, local_rope=local_rope, qk_norm=version == 3)


def _layer_types(raw: dict[str, Any], architecture: str, source: str) -> list[str]:
    num_layers = int(raw["num_hidden_layers"])
    types = raw.get("layer_types")
    if types is None:
        pattern = int(raw.get("sliding_window_pattern") or _DEFAULT_PATTERN[architecture])
        return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
    if len(types) != num_layers or any(kind not in _LAYER_TYPES for kind in types):
        raise ValueError(f"{source}: layer_types must list {num_layers} entries, each one of "
                         f"{', '.join(_LAYER_TYPES)}; got {types!r}")
    return list(types)


def _rope_view(raw: dict[str, Any], layer_type: str, architecture: str) -> dict[str, Any]:
    """A flat config dict holding the rotary parameters of one layer type, as config._rope reads them."""
    nested = raw.get("rope_parameters")
    if isinstance(nested, dict) and isinstance(nested.get(layer_type), dict):
        return {**raw, "rope_parameters": nested[layer_type]}
    if isinstance(nested, dict) and nested and not any(k in nested for k in _LAYER_TYPES):
        return raw                                      # one flat set for every layer (Gemma 2)
    if layer_type == "sliding_attention":
        return {"rope_theta": raw.get("rope_local_base_freq", 10000.0)}
    return {**raw, "rope_parameters": None,
            "rope_theta": raw.get("rope_theta", _DEFAULT_GLOBAL_THETA[architecture])}


def _cap(raw: dict[str, Any], key: str, source: str) -> float | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{source}: {key} must be a positive number or null, got {value!r}")
    return float(value)
