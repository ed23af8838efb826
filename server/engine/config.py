"""The engine's configuration: one frozen dataclass composed of sub-configs, each the only home
of its defaults, each validated once when it is built (torch-free, so the CLI can check flags
without loading torch).

    EngineConfig
      model_dir, dtype, device, cpu_kernels, seed     what runs where
      quant:     QuantConfig       (layers/options.py)  how the base linears are stored
      scheduler: SchedulerConfig   batching, adapter and length limits per step
      cache:     CacheConfig       paged KV cache
      lora:      LoraConfig        adapter slots' rank and dtype
      limits:    RequestLimits     what one request may ask for
      structured: StructuredConfig structured output (grammar cache, compile time limit)

Components take their sub-config whole (the scheduler its SchedulerConfig, the layers a
QuantSpec resolved from QuantConfig). A problem is reported as a `ConfigProblem` whose `path`
names the field (`scheduler.max_model_len`), so a front end can name its own flag instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

from ..layers.options import CPU_KERNEL_CHOICES, QuantConfig
from ..problems import ConfigProblem, InvalidConfig, at_least, one_of, raise_if

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
ADAPTER_DTYPE_CHOICES = ("float32", "bfloat16", "float16", "compute")   # compute: the base dtype


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64           # running sequences per step
    max_batch_tokens: int = 2048     # token budget per step (decodes count 1 each)
    max_loras: int = 8               # distinct adapters per step (= device slots)
    max_model_len: int = 4096        # prompt + generated tokens per request -> FinishReason.LENGTH
    max_queued_requests: int = 256   # waiting requests before new ones are refused (QueueFull)
    watermark_blocks: int = 0        # free blocks kept in reserve when admitting new sequences
    max_overtakes: int = 32          # later arrivals admitted past a capacity-blocked sequence

    def __post_init__(self) -> None:
        raise_if(self.problems())

    def problems(self) -> Iterator[ConfigProblem]:
        yield from at_least(self, 1, ("max_num_seqs", "max_batch_tokens", "max_loras", "max_model_len",
                                       "max_queued_requests"))
        yield from at_least(self, 0, ("watermark_blocks", "max_overtakes"))
        if self.max_batch_tokens < self.max_num_seqs:
            yield ConfigProblem("max_batch_tokens", f"({self.max_batch_tokens}) must be >= max_num_seqs "
                                f"({self.max_num_seqs}) so every running sequence can decode each step")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache; sized by model/kv_sizing.py (the startup log says how big and why)."""

    kv_cache_memory: str = "auto"        # auto (by demand, within the cap), bytes ("2GiB") or a fraction
    kv_cache_max_memory: str = "0.25"    # auto's cap: bytes or a fraction of free memory
    prefix_cache_share: float = 0.25     # auto: extra blocks for cached prefixes, share of the demand
    block_size: int = 16                 # tokens per KV block
    prefix_caching: bool = True          # reuse cached full blocks of shared prefixes (block_manager.py)

    def __post_init__(self) -> None:
        raise_if(self.problems())

    def problems(self) -> Iterator[ConfigProblem]:
        from ..model.memory_budget import parse_memory_budget

        yield from at_least(self, 1, ("block_size",))
        for name in ("kv_cache_memory", "kv_cache_max_memory"):
            value = getattr(self, name)
            if name == "kv_cache_memory" and str(value).strip().lower() == "auto":
                continue
            try:
                parse_memory_budget(value)
            except ValueError:
                auto = " or 'auto'" if name == "kv_cache_memory" else ""
                yield ConfigProblem(name, f"{value!r} is not understood: use bytes with a unit ('2GiB'), "
                                          f"a fraction of free memory ('0.3'){auto}")
        if not 0 <= self.prefix_cache_share <= 10:
            yield ConfigProblem("prefix_cache_share", f"must be in [0, 10] (got {self.prefix_cache_share})")


@dataclass(frozen=True)
class LoraConfig:
    max_lora_rank: int = 64          # largest adapter rank accepted (slots pad to the largest loaded)
    adapter_dtype: str = "float32"   # float32 (PEFT default), bfloat16, float16 or compute

    def __post_init__(self) -> None:
        raise_if(self.problems())

    def problems(self) -> Iterator[ConfigProblem]:
        yield from at_least(self, 1, ("max_lora_rank",))
        yield from one_of(self.adapter_dtype, ADAPTER_DTYPE_CHOICES, "adapter_dtype")


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for (checked by engine/validation.py at the engine boundary)."""

    max_input_tokens: int = 3072     # longest prompt in tokens (< scheduler.max_model_len)
    max_new_tokens: int = 2048       # cap on a request's max_new_tokens
    max_stop_sequences: int = 8
    default_max_new_tokens: int = 256   # when a request leaves max_new_tokens unset (capped)
    max_constraint_bytes: int = 65536   # a structured-output constraint's text (schema, regex, grammar)

    def __post_init__(self) -> None:
        raise_if(self.problems())

    def problems(self) -> Iterator[ConfigProblem]:
        yield from at_least(self, 1, ("max_input_tokens", "max_new_tokens", "default_max_new_tokens",
                                       "max_constraint_bytes"))
        yield from at_least(self, 0, ("max_stop_sequences",))


@dataclass(frozen=True)
class StructuredConfig:
    """Structured output (docs/structured-output.md)."""

    structured_output: bool = True       # accept per-request constraints (llguidance)
    constraint_cache_size: int = 256     # compiled grammars kept, LRU by constraint hash
    constraint_timeout_s: float = 10.0   # a request waits at most this long for its compile
    constraint_mask_budget_ms: float = 10.0   # grammars whose token mask costs more are refused

    def __post_init__(self) -> None:
        raise_if(self.problems())

    def problems(self) -> Iterator[ConfigProblem]:
        yield from at_least(self, 1, ("constraint_cache_size",))
        if not self.constraint_timeout_s > 0:
            yield ConfigProblem("constraint_timeout_s", "must be > 0")
        if not self.constraint_mask_budget_ms > 0:
            yield ConfigProblem("constraint_mask_budget_ms", "must be > 0")


SUB_CONFIGS: dict[str, type] = {"quant": QuantConfig, "scheduler": SchedulerConfig, "cache": CacheConfig,
                                "lora": LoraConfig, "limits": RequestLimits, "structured": StructuredConfig}


@dataclass(frozen=True)
class EngineConfig:
    model_dir: Path
    dtype: str = "auto"              # auto = float32 on CPU, bfloat16 on CUDA
    device: str = "auto"             # auto = cuda if available else cpu
    cpu_kernels: str = "auto"        # auto = fused C++ layer ops on CPU float32 when they build
    seed: int = 0                    # engine sampling seed
    tokenizer_nice: int = 10         # the tokenizer thread's nice value above the process's (tokenizer_pool.py)
    quant: QuantConfig = field(default_factory=QuantConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    limits: RequestLimits = field(default_factory=RequestLimits)
    structured: StructuredConfig = field(default_factory=StructuredConfig)

    def __post_init__(self) -> None:
        raise_if(self.problems())

    def problems(self) -> Iterator[ConfigProblem]:
        """The problems that span fields (each sub-config checked its own when built)."""
        yield from one_of(self.dtype, DTYPE_CHOICES, "dtype")
        yield from one_of(self.cpu_kernels, CPU_KERNEL_CHOICES, "cpu_kernels")
        if not 0 <= self.tokenizer_nice <= 19:
            yield ConfigProblem("tokenizer_nice", "must be 0 (the engine's priority) to 19 (the lowest)")
        if self.limits.max_input_tokens >= self.scheduler.max_model_len:
            yield ConfigProblem("limits.max_input_tokens", "must be smaller than max_model_len")

    @classmethod
    def from_settings(cls, model_dir: Path | str, **settings: Any) -> "EngineConfig":
        """Build from flat settings, each routed by its (unique) name to the sub-config that owns
        it: `from_settings(d, method="hqq-4bit", max_model_len=512)`. Every problem of every
        sub-config is reported at once (InvalidConfig with paths like `scheduler.max_loras`)."""
        owners = setting_owners()
        unknown = sorted(set(settings) - set(owners))
        if unknown:
            raise InvalidConfig(ConfigProblem(name, "is not an engine setting") for name in unknown)
        grouped: dict[str, dict[str, Any]] = {}
        for name, value in settings.items():
            grouped.setdefault(owners[name], {})[name] = value
        top = grouped.pop("", {})
        parts, problems = {}, []
        for part, values in grouped.items():
            try:
                parts[part] = SUB_CONFIGS[part](**values)
            except InvalidConfig as error:
                problems += [ConfigProblem(f"{part}.{p.path}", p.message) for p in error.problems]
        try:
            config = cls(model_dir=Path(model_dir), **top, **parts)   # defaults stand in for bad parts
        except InvalidConfig as error:
            problems += error.problems
        if problems:
            raise InvalidConfig(problems)
        return config


def setting_owners() -> dict[str, str]:
    """Flat setting name -> the EngineConfig field that owns it ("" = EngineConfig itself)."""
    owners = {f.name: "" for f in fields(EngineConfig) if f.name not in SUB_CONFIGS and f.name != "model_dir"}
    for part, config_type in SUB_CONFIGS.items():
        for f in fields(config_type):
            if f.name in owners:
                raise AssertionError(f"setting {f.name!r} has two owners")  # one name per setting
            owners[f.name] = part
    return owners
