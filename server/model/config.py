"""The served model's architecture, read and validated from an HF `config.json`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .gemma_config import GEMMA_ARCHITECTURES, GemmaSpec, gemma_spec
from .moe_config import MOE_ARCHITECTURES, MoeConfig, parse_moe
from .rope_config import RopeConfig

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                           *MOE_ARCHITECTURES, "Phi3ForCausalLM", *GEMMA_ARCHITECTURES)
QK_NORM_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")    # per-head q/k RMSNorm (qwen3.py)
FUSED_CHECKPOINT_ARCHITECTURES = ("Phi3ForCausalLM",)   # qkv_proj / gate_up_proj stored (and adapted) fused
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear", "yarn", "longrope")
# dynamic NTK rescales every frequency by the current sequence length: keys already in the paged
# cache were rotated with other frequencies than later queries, so it cannot be cached exactly.
REFUSED_ROPE_TYPES = {"dynamic": "dynamic NTK scaling changes every key's rotation with the sequence length, "
                                 "which a KV cache cannot follow",
                      "su": "Phi-3's name for longrope; only Phi3ForCausalLM configs use it"}
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass(frozen=True)
class ModelConfig:
    """Everything the model, KV cache and adapter code need to know about the architecture."""

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool
    sliding_window: int | None = None   # Mistral: keys older than this many positions are masked
    qk_norm: bool = False               # Qwen3: RMSNorm over each q and k head before rotary
    moe: MoeConfig | None = None        # Qwen3-MoE: every layer's MLP is a routed expert block (moe.py)
    fused_checkpoint: bool = False      # Phi-3: qkv_proj and gate_up_proj are single modules (loader.py)
    gemma: GemmaSpec | None = None      # Gemma 2/3: the layer's extras (gemma_config.py)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each HF linear module name in one decoder layer
        (a MoE layer has no dense MLP: its experts are `moe.expert_shapes`)."""
        h, i = self.hidden_size, self.intermediate_size
        if self.fused_checkpoint:
            return {"qkv_proj": (h, self.q_size + 2 * self.kv_size), "o_proj": (self.q_size, h),
                    "gate_up_proj": (h, 2 * i), "down_proj": (i, h)}
        attention = {"q_proj": (h, self.q_size), "k_proj": (h, self.kv_size), "v_proj": (h, self.kv_size),
                     "o_proj": (self.q_size, h)}
        if self.moe is not None:
            return attention
        return {**attention, "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @staticmethod
    def from_dir(path: str | Path) -> "ModelConfig":
        """Read `<path>/config.json`; raise ValueError naming what is unsupported."""
        config_path = Path(path) / "config.json"
        try:
            raw = json.loads(config_path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{config_path} not found: --model must be an HF model directory") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_path} is not valid JSON: {error}") from None
        return ModelConfig.from_dict(raw, source=str(config_path))

    @staticmethod
    def from_dict(raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        architecture = _architecture(raw, source)
        gemma = gemma_spec(raw, architecture, source, _rope) if architecture in GEMMA_ARCHITECTURES else None
        act = raw.get("hidden_act", "silu")
        if act != "silu" and gemma is None:
            raise ValueError(f"{source}: hidden_act={act!r} is not supported (only 'silu')")
        num_heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        head_dim = raw.get("head_dim") or hidden // num_heads
        num_kv_heads = int(raw.get("num_key_value_heads") or num_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"{source}: num_attention_heads={num_heads} is not a multiple of "
                             f"num_key_value_heads={num_kv_heads}")
        rope = gemma.global_rope if gemma is not None else _rope(raw, source, architecture)
        max_positions = int(raw.get("max_position_embeddings", 2048))
        if rope.rope_type == "longrope":     # served up to the original length: short factors only
            max_positions = min(max_positions, rope.original_max_position_embeddings)
        return ModelConfig(
            architecture=architecture, model_type=str(raw.get("model_type", "")),
            vocab_size=int(raw["vocab_size"]), hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]), num_heads=num_heads,
            num_kv_heads=num_kv_heads, head_dim=int(head_dim),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=max_positions,
            rope=rope, tie_word_embeddings=bool(raw.get("tie_word_embeddings", gemma is not None)),
            sliding_window=_sliding_window(raw, architecture, source),
            qk_norm=architecture in QK_NORM_ARCHITECTURES, moe=parse_moe(raw, architecture, source),
            fused_checkpoint=architecture in FUSED_CHECKPOINT_ARCHITECTURES, gemma=gemma,
        )


def _architecture(raw: dict[str, Any], source: str) -> str:
    names = raw.get("architectures") or []
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    shown = ", ".join(names) if names else "none listed"
    raise ValueError(f"{source}: unsupported model architecture ({shown}); loraplex supports "
                     f"{', '.join(SUPPORTED_ARCHITECTURES)}")


def _rope(raw: dict[str, Any], source: str, architecture: str = "") -> RopeConfig:
    # transformers 5.x: `rope_parameters` (theta inside); 4.x: `rope_theta` + `rope_scaling`.
    params = dict(raw.get("rope_parameters") or {})
    if not params:
        params = dict(raw.get("rope_scaling") or {})
        params.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if architecture in FUSED_CHECKPOINT_ARCHITECTURES and rope_type in ("su", "yarn"):
        rope_type = "longrope"           # as transformers' Phi3Config reads them
    if rope_type not in SUPPORTED_ROPE_TYPES:
        why = f" ({REFUSED_ROPE_TYPES[rope_type]})" if rope_type in REFUSED_ROPE_TYPES else ""
        raise ValueError(f"{source}: rope type {rope_type!r} is not supported{why}; loraplex supports "
                         f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    if params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor is not supported (rotary over the whole head only)")
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if rope_type in ("linear", "yarn"):
        return _scaled_rope(raw, params, rope_type, theta, source)
    if rope_type == "longrope":
        return _longrope(raw, params, theta, source)
    missing = [key for key in _LLAMA3_KEYS if key not in params]
    if missing:
        raise ValueError(f"{source}: llama3 rope scaling needs {', '.join(missing)}")
    return RopeConfig(theta=theta, rope_type="llama3", factor=float(params["factor"]),
                      low_freq_factor=float(params["low_freq_factor"]),
                      high_freq_factor=float(params["high_freq_factor"]),
                      original_max_position_embeddings=int(params["original_max_position_embeddings"]))


def _scaled_rope(raw: dict[str, Any], params: dict[str, Any], rope_type: str, theta: float,
                 source: str) -> RopeConfig:
    if params.get("factor") is None and rope_type == "linear":
        raise ValueError(f"{source}: linear rope scaling needs factor")
    original = int(params.get("original_max_position_embeddings") or raw.get("max_position_embeddings", 2048))
    factor = params.get("factor")
    factor = float(factor) if factor is not None else raw.get("max_position_embeddings", original) / original
    optional = {key: float(params[key]) for key in ("attention_factor", "mscale", "mscale_all_dim")
                if params.get(key) is not None}
    return RopeConfig(theta=theta, rope_type=rope_type, factor=factor, original_max_position_embeddings=original,
                      beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
                      truncate=bool(params.get("truncate", True)), **optional)


def _longrope(raw: dict[str, Any], params: dict[str, Any], theta: float, source: str) -> RopeConfig:
    """Phi-3 LongRoPE. transformers switches every position to `long_factor` once the sequence
    passes original_max_position_embeddings, which changes the rotation of keys already cached;
    below it the `short_factor` rotation is fixed, so loraplex serves up to that length."""
    original = params.get("original_max_position_embeddings") or raw.get("original_max_position_embeddings")
    short = params.get("short_factor")
    if not original or not isinstance(short, list) or not short:
        raise ValueError(f"{source}: longrope rope scaling needs original_max_position_embeddings and short_factor")
    factor = params.get("factor")
    factor = float(factor) if factor is not None else raw.get("max_position_embeddings", original) / original
    attention = params.get("attention_factor")
    return RopeConfig(theta=theta, rope_type="longrope", factor=factor, original_max_position_embeddings=int(original),
                      short_factor=tuple(float(f) for f in short),
                      attention_factor=None if attention is None else float(attention))


def _sliding_window(raw: dict[str, Any], architecture: str, source: str) -> int | None:
    window = raw.get("sliding_window")
    if architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
        if raw.get("use_sliding_window"):
            raise ValueError(f"{source}: {architecture.removesuffix('ForCausalLM')} use_sliding_window=true "
                             "(per-layer windows) is not supported; set it to false")
        return None
    if architecture in ("MistralForCausalLM", "Phi3ForCausalLM") and window:
        return int(window)
    return None
