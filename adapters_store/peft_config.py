"""Parse and check a PEFT `adapter_config.json` (LoRA only), rule by rule."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import AdapterValidationError
from .expert_tensors import expert_pattern_ranks, parse_target_parameters
from .strict_json import StrictJsonError, loads_strict
from .target_regex import TargetRegex, match_target_regex, module_name
from .types import BaseSpec

FINGERPRINT_KEY = "loraplex_base_fingerprint"
EMBEDDING_MODULES = ("embed_tokens", "lm_head", "embed", "wte", "wpe", "embed_out")
VOCAB_MODULES = ("embed_tokens", "lm_head")       # served per request (LoRA or modules_to_save)


@dataclass(frozen=True)
class ParsedConfig:
    """The checked config. Exactly one of target_names / target_regex is set."""

    rank: int
    lora_alpha: float
    use_rslora: bool
    use_dora: bool
    target_names: tuple[str, ...] | None
    target_regex: TargetRegex | None
    base_model: str | None
    base_fingerprint: str | None
    vocab_lora: frozenset[str] = frozenset()       # embed_tokens / lm_head in target_modules
    modules_to_save: frozenset[str] = frozenset()  # embed_tokens / lm_head saved whole
    target_parameters: tuple[str, ...] = ()        # MoE expert parameters (expert_tensors.py)
    expert_ranks: dict[str, int] = field(default_factory=dict)   # expert param -> rank, where not `rank`

    @property
    def scaling(self) -> float:
        """PEFT's scale: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def targets_module(self, layer_idx: int, parent: str, module: str) -> bool:
        """Whether the config targets `model.layers.{layer_idx}.{parent}.{module}`."""
        if self.target_names is not None:
            return module in self.target_names
        return module_name(layer_idx, parent, module) in self.target_regex.selected


def parse_config(raw: bytes, base: BaseSpec, max_lora_rank: int, allow_base_mismatch: bool) -> ParsedConfig:
    """Check adapter_config.json bytes against the schema and the served base."""
    config = _load_json(raw)
    _refuse_unsupported(config)
    rank = _required(config, "r", lambda v: _is_int(v) and v >= 1, "an integer >= 1")
    if rank > max_lora_rank:
        raise AdapterValidationError("rank_limit", f"adapter rank r={rank} is above this server's limit of "
                                     f"{max_lora_rank}; retrain with a smaller r or start the server with "
                                     f"--max-lora-rank {rank}")
    alpha = _required(config, "lora_alpha", lambda v: _is_number(v) and math.isfinite(v) and v != 0,
                      "a finite non-zero number")
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise _field("use_rslora", "must be true or false")
    use_dora = config.get("use_dora", False)
    if not isinstance(use_dora, bool):
        raise _field("use_dora", "must be true or false")
    params = parse_target_parameters(config.get("target_parameters"), base)
    expert_ranks, expert_keys = expert_pattern_ranks(config, rank, alpha, use_rslora, params)
    _check_patterns(config, rank, alpha, skip=expert_keys)
    if any(r > max_lora_rank for r in expert_ranks.values()):
        raise AdapterValidationError("rank_limit", f"expert ranks {expert_ranks} (rank_pattern) exceed this "
                                     f"server's limit of {max_lora_rank}; start it with a larger --max-lora-rank")
    base_model = config.get("base_model_name_or_path")
    if base_model is not None and not isinstance(base_model, str):
        raise _field("base_model_name_or_path", "must be a string or null")
    if use_dora and params:
        raise AdapterValidationError("use_dora", "DoRA on MoE experts (target_parameters) is not supported "
                                     "(PEFT's ParamWrapper refuses it too)")
    names, regex = _targets(config, base, allow_empty=bool(params))
    vocab_lora = frozenset(n for n in names or () if n in VOCAB_MODULES)
    if use_dora and vocab_lora:
        raise AdapterValidationError("use_dora", f"DoRA on {', '.join(sorted(vocab_lora))} is not supported "
                                     f"(only on decoder linear layers): PEFT's DoRA embedding scales whole "
                                     f"embedding rows, which the per-request embedding path does not apply")
    saved = _modules_to_save(config, vocab_lora)
    fingerprint = _fingerprint(config, base, allow_base_mismatch)
    names = None if names is None else tuple(n for n in names if n not in VOCAB_MODULES)
    return ParsedConfig(rank, float(alpha), use_rslora, use_dora, names, regex, base_model, fingerprint,
                        vocab_lora, saved, params, expert_ranks)


def _load_json(raw: bytes) -> dict:
    try:
        config = loads_strict(raw)
    except StrictJsonError as error:
        raise AdapterValidationError("config_json", f"adapter_config.json is not valid UTF-8 JSON ({error})") from None
    if not isinstance(config, dict):
        raise AdapterValidationError("config_json", "adapter_config.json must be a JSON object")
    return config


def _refuse_unsupported(config: dict) -> None:
    if "peft_type" not in config:
        raise _field("peft_type", "is missing; PEFT LoRA configs have \"peft_type\": \"LORA\"", missing=True)
    if config["peft_type"] != "LORA":
        raise AdapterValidationError("peft_type", f"peft_type {config['peft_type']!r} is not supported; only "
                                     f"LoRA adapters (\"LORA\") can be served")
    if config.get("bias", "none") != "none":
        raise AdapterValidationError("bias", f"bias={config['bias']!r} trains base biases; only bias=\"none\" "
                                     f"adapters can be served")
    if config.get("fan_in_fan_out"):
        raise AdapterValidationError("fan_in_fan_out", "fan_in_fan_out=true (Conv1D layouts) does not match "
                                     "Llama-family linear layers")


def _check_patterns(config: dict, rank: int, alpha: float, skip: set[str] = frozenset()) -> None:
    for key, expected in (("rank_pattern", rank), ("alpha_pattern", alpha)):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise _field(key, "must be an object mapping module patterns to numbers")
        differing = {name: value for name, value in pattern.items() if value != expected and name not in skip}
        if differing:
            raise AdapterValidationError(key, f"{key} gives some modules different values {differing} (global "
                                         f"value {expected}); per-module ranks/alphas are not supported")


def _targets(config: dict, base: BaseSpec, allow_empty: bool = False
             ) -> tuple[tuple[str, ...] | None, TargetRegex | None]:
    if allow_empty and config.get("target_modules") in (None, []):
        return (), None                   # experts only (target_parameters)
    targets = _required(config, "target_modules", lambda v: isinstance(v, (str, list)) and len(v) > 0,
                        "a non-empty list of module names or a regex string")
    if isinstance(targets, str):
        return None, _target_regex(targets, base)
    names = []
    for target in targets:
        if not isinstance(target, str):
            raise _field("target_modules", f"entries must be strings, got {target!r}")
        module = target.rsplit(".", 1)[-1]
        if module in VOCAB_MODULES:
            names.append(module)
            continue
        if module in EMBEDDING_MODULES:
            raise _embedding(target)
        if module not in base.module_shapes:
            hint = (" (its MLP is routed experts: adapt them with target_parameters "
                    "[\"mlp.experts.gate_up_proj\", \"mlp.experts.down_proj\"]; an adapter trained on "
                    "transformers 4's per-expert modules: load it with PEFT >= 0.21 on transformers 5, which "
                    "converts it, and save it again)") if base.expert_shapes else ""
            raise AdapterValidationError("unknown_target", f"target module {target!r} is not a linear layer of "
                                         f"the served base{hint} (choose from {sorted(base.module_shapes)})")
        names.append(module)
    return tuple(names), None


def _modules_to_save(config: dict, vocab_lora: frozenset[str]) -> frozenset[str]:
    """modules_to_save: only embed_tokens / lm_head (whole vocabulary tables, served per request)."""
    saved = config.get("modules_to_save") or []
    if not isinstance(saved, list) or not all(isinstance(m, str) for m in saved):
        raise _field("modules_to_save", "must be a list of module names or null")
    modules = {m.rsplit(".", 1)[-1] for m in saved}
    other = sorted(m for m in saved if m.rsplit(".", 1)[-1] not in VOCAB_MODULES)
    if other:
        raise AdapterValidationError("modules_to_save", f"modules_to_save={other!r}: only embed_tokens and "
                                     f"lm_head can be saved whole per adapter (they are looked up / applied "
                                     f"per request); a whole decoder module (a norm, a projection, a "
                                     f"classifier head) would have to replace the shared base layer for "
                                     f"every request in the batch. Train a LoRA on it instead")
    both = sorted(modules & vocab_lora)
    if both:
        raise AdapterValidationError("modules_to_save", f"{both} are both LoRA targets and modules_to_save; "
                                     f"PEFT trains one or the other per module")
    return frozenset(modules)


def _target_regex(pattern: str, base: BaseSpec) -> TargetRegex:
    if pattern == "all-linear":
        return TargetRegex(pattern, frozenset(module_name(i, parent, m) for i in range(base.num_layers)
                                              for m in base.module_shapes for parent in ("self_attn", "mlp")))
    return match_target_regex(pattern, base)


def _fingerprint(config: dict, base: BaseSpec, allow_base_mismatch: bool) -> str | None:
    recorded = config.get(FINGERPRINT_KEY)
    if recorded is None:
        return None
    if not isinstance(recorded, str):
        raise _field(FINGERPRINT_KEY, "must be a string")
    if recorded != base.fingerprint and not allow_base_mismatch:
        raise AdapterValidationError("base_fingerprint", f"the adapter records base fingerprint {recorded!r} "
                                     f"but this server serves {base.fingerprint!r}. An adapter trained or "
                                     f"initialised on another backbone (e.g. LoftQ on a differently quantized "
                                     f"base) is only correct on that backbone; serve it on the matching base, or "
                                     f"register with allow_base_mismatch if you accept different outputs")
    return recorded


def _required(config: dict, key: str, ok, expected: str):
    if key not in config:
        raise _field(key, f"is missing; it must be {expected}", missing=True)
    if not ok(config[key]):
        raise _field(key, f"must be {expected}, got {config[key]!r}")
    return config[key]


def _field(key: str, problem: str, missing: bool = False) -> AdapterValidationError:
    rule = "config_missing_field" if missing else "config_field"
    return AdapterValidationError(rule, f"adapter_config.json: {key!r} {problem}")


def _embedding(target: str) -> AdapterValidationError:
    return AdapterValidationError("embedding_target", f"target {target!r} is not a module of a Llama-family "
                                  f"model; LoRA on the vocabulary is served on embed_tokens and lm_head")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
