"""MoE expert LoRA tensors: PEFT `target_parameters` on a Qwen3-MoE base's fused 3-D experts.

PEFT (>= 0.17, transformers 5) adapts `mlp.experts.gate_up_proj` [E, 2 * inter, hidden] and
`mlp.experts.down_proj` [E, hidden, inter] with lora.ParamWrapper: one wrapper per parameter,
nested around the experts module in the parameters' registration order (gate_up_proj first,
innermost). The weights are saved under the module's name, one `base_layer.` per level of
nesting from the outside:

    base_model.model.model.layers.{i}.mlp.experts.lora_A.weight             (outermost)
    base_model.model.model.layers.{i}.mlp.experts.base_layer.lora_A.weight  (next one in)

so the config's targeted parameters say which tensor is which. A holds every expert's A
stacked, [E * r, in_features] (expert e: rows e*r:(e+1)*r); B is [out_features, r * E] with
column k * E + e for expert e's rank k (PEFT's get_delta_weight layout).

Per-expert LoRA modules (transformers 4's `mlp.experts.{e}.gate_proj`) are refused by name.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .errors import AdapterValidationError
from .types import BaseSpec

EXPERT_PARAMS = ("gate_up_proj", "down_proj")   # registration order in transformers' Qwen3MoeExperts
EXPERT_TARGET_PREFIX = "experts."              # how expert targets appear in LoraConfigInfo.target_modules
_EXPERT_RE = re.compile(r"(?:base_model\.model\.)?model\.layers\.(0|[1-9][0-9]{0,5})\.mlp\.experts\."
                        r"((?:base_layer\.)*)lora_([AB])(?:\.default)?\.weight", re.ASCII)
_PER_EXPERT_RE = re.compile(r".*\.mlp\.experts\.[0-9]+\.[A-Za-z0-9_]+\.lora_.*", re.ASCII)
# rank_pattern / alpha_pattern keys naming one expert parameter (PEFT writes `.*\.gate_up_proj`)
_PATTERN_KEY = re.compile(r"(?:\.\*\\?\.|\^)?(?:(?:mlp\\?\.)?experts\\?\.)?(gate_up_proj|down_proj)\$?", re.ASCII)


@dataclass(frozen=True)
class ExpertTensorName:
    layer_idx: int
    depth: int            # number of `base_layer.` infixes: 0 = the outermost wrapper
    factor: str           # "A" | "B"


def parse_expert_tensor_name(name: str) -> ExpertTensorName | None:
    """The expert tensor `name` names, None when it is not one; refuses per-expert modules."""
    match = _EXPERT_RE.fullmatch(name)
    if match is not None:
        layer, infixes, factor = match.groups()
        return ExpertTensorName(int(layer), infixes.count("base_layer."), factor)
    if _PER_EXPERT_RE.fullmatch(name):
        raise AdapterValidationError("expert_modules", f"tensor {name!r} is LoRA on one expert's own module "
                                     f"(transformers 4's per-expert layout); loraplex serves expert LoRA in PEFT's "
                                     f"target_parameters form (mlp.experts.gate_up_proj / mlp.experts.down_proj, "
                                     f"transformers 5): load the adapter with PEFT >= 0.21 on transformers 5, which "
                                     f"converts it, and save it again")
    return None


def parse_target_parameters(raw: object, base: BaseSpec) -> tuple[str, ...]:
    """adapter_config.json `target_parameters` -> the expert parameter names it targets, in
    EXPERT_PARAMS order; AdapterValidationError naming what is not served."""
    if raw is None or raw == []:
        return ()
    if not isinstance(raw, list) or not all(isinstance(t, str) for t in raw):
        raise _field("must be a list of parameter names or null")
    if not base.expert_shapes:
        raise AdapterValidationError("target_parameters", f"target_parameters={raw!r} adapts nn.Parameters "
                                     f"directly; the served base ({base.architecture}) has no MoE experts, and "
                                     f"only expert parameters can be adapted this way")
    targeted = set()
    for target in raw:
        prefix, _, param = target.rpartition(".")
        if param not in base.expert_shapes or prefix not in ("", "experts", "mlp.experts"):
            raise _field(f"entry {target!r} is not served: use mlp.experts.gate_up_proj and/or "
                         f"mlp.experts.down_proj (the same parameters in every layer)")
        targeted.add(param)
    return tuple(p for p in EXPERT_PARAMS if p in targeted)


def expert_pattern_ranks(config: dict, rank: int, alpha: float, use_rslora: bool, params: tuple[str, ...]
                         ) -> tuple[dict[str, int], set[str]]:
    """Per-parameter expert ranks from rank_pattern / alpha_pattern, and the pattern keys handled.

    PEFT converts a per-expert adapter (transformers 4) by stacking gate's and up's LoRA: gate_up
    gets twice the rank and twice the alpha (`rank_pattern` / `alpha_pattern` `.*\\.gate_up_proj`),
    so its scale is the global one. Such patterns are served; one that changes an expert
    parameter's scale is refused (one scale per adapter)."""
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    if not isinstance(ranks, dict) or not isinstance(alphas, dict):
        return {}, set()
    out, handled = {}, set()
    for key in sorted(set(ranks) | set(alphas)):
        match = _PATTERN_KEY.fullmatch(key)
        if match is None or match.group(1) not in params:
            continue
        param, r_p, a_p = match.group(1), ranks.get(key, rank), alphas.get(key, alpha)
        if isinstance(r_p, bool) or not isinstance(r_p, int) or r_p < 1 or isinstance(a_p, bool) \
                or not isinstance(a_p, (int, float)) or not math.isfinite(a_p):
            raise AdapterValidationError("rank_pattern", f"rank_pattern / alpha_pattern {key!r}: rank {r_p!r} and "
                                         f"alpha {a_p!r} must be an integer >= 1 and a finite number")
        if not math.isclose(_scale(a_p, r_p, use_rslora), _scale(alpha, rank, use_rslora), rel_tol=1e-9):
            raise AdapterValidationError("rank_pattern", f"rank_pattern / alpha_pattern give experts {param} rank "
                                         f"{r_p} and alpha {a_p:g}, a scale other than the adapter's ({alpha:g} / "
                                         f"r={rank}); one scale per adapter is supported")
        out[param] = r_p
        handled.add(key)
    return out, handled


def _scale(alpha: float, rank: int, use_rslora: bool) -> float:
    return alpha / (math.sqrt(rank) if use_rslora else rank)


def expert_param(name: ExpertTensorName, targeted: tuple[str, ...], tensor: str) -> str:
    """Which targeted parameter the tensor at `name.depth` belongs to (innermost = first targeted)."""
    if name.depth >= len(targeted):
        raise AdapterValidationError("target_mismatch", f"tensor {tensor!r} is an expert LoRA at nesting depth "
                                     f"{name.depth}, but adapter_config.json target_parameters lists "
                                     f"{len(targeted)} expert parameter(s) ({', '.join(targeted) or 'none'})")
    return targeted[len(targeted) - 1 - name.depth]


def check_expert_shape(tensor: str, shape: tuple[int, ...], factor: str, param: str, rank: int,
                       base: BaseSpec) -> None:
    experts, in_features, out_features = base.expert_shapes[param]
    expected = (rank * experts, in_features) if factor == "A" else (out_features, rank * experts)
    if shape != expected:
        raise AdapterValidationError("shape", f"tensor {tensor!r} (experts {param}, lora_{factor}) has shape "
                                     f"{list(shape)}, expected {list(expected)} ({experts} experts, r={rank}, "
                                     f"in {in_features}, out {out_features}); the adapter was trained for a "
                                     f"different base or rank")


def check_experts_complete(found: set[tuple[int, str, str]], targeted: tuple[str, ...], num_layers: int) -> None:
    """Every layer has lora_A and lora_B of every targeted expert parameter."""
    for layer in range(num_layers):
        for param in targeted:
            for factor in ("A", "B"):
                if (layer, param, factor) not in found:
                    raise AdapterValidationError("missing_pair", f"layer {layer} experts {param} has no "
                                                 f"lora_{factor} weight; target_parameters lists it")


def split_experts(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                               dict[ExpertTensorName, torch.Tensor]]:
    """(other tensors by name, expert tensors by parsed name)."""
    others, experts = {}, {}
    for name, tensor in tensors.items():
        parsed = parse_expert_tensor_name(name)
        if parsed is None:
            others[name] = tensor
        else:
            experts[parsed] = tensor
    return others, experts


def targeted_params(target_modules: tuple[str, ...]) -> tuple[str, ...]:
    """The expert parameters a validated config targets (LoraConfigInfo.target_modules lists
    them as `experts.<param>`), in EXPERT_PARAMS order."""
    return tuple(p for p in EXPERT_PARAMS if EXPERT_TARGET_PREFIX + p in target_modules)


def expert_weights(tensors: dict[ExpertTensorName, torch.Tensor], targeted: tuple[str, ...],
                   dtype: torch.dtype) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """{(layer, param): (A [E * r, in], B [out, r * E])} in `dtype`, PEFT's stacked layout (the
    device slots, which know E, split it per expert: lora/experts.py)."""
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        param = targeted[len(targeted) - 1 - name.depth]
        pairs.setdefault((name.layer_idx, param), {})[name.factor] = tensor.to(dtype).contiguous()
    return {key: (pair["A"], pair["B"]) for key, pair in sorted(pairs.items())}


def _field(problem: str) -> AdapterValidationError:
    return AdapterValidationError("config_field", f"adapter_config.json: 'target_parameters' {problem}")
