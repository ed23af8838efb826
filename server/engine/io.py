"""What goes into the engine and what comes out, per request (used by the service layer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .chat_options import ChatOptions
from .sequence import FinishReason, SamplingParams


class EngineError(Exception):
    """Base of errors the engine raises to callers; the service maps them to status codes."""


@dataclass(frozen=True)
class Violation:
    """One problem of a request; `field` is a path inside GenerationRequest (validation.py)."""

    field: str
    description: str


class RequestRejected(EngineError):
    """The request cannot run as given (too long, bad parameters). -> INVALID_ARGUMENT.

    `violations` lists every problem found; `field_name`/`message` are the first one's.
    """

    def __init__(self, field_name: str, message: str, violations: tuple[Violation, ...] = ()):
        self.violations = violations or (Violation(field_name, message),)
        super().__init__("; ".join(f"{v.field or 'input'}: {v.description}" for v in self.violations))
        self.field_name = field_name
        self.message = message

    @classmethod
    def of(cls, violations: list[Violation] | tuple[Violation, ...]) -> "RequestRejected":
        first = violations[0]
        return cls(first.field, first.description, tuple(violations))


class QueueFull(EngineError):
    """Too many queued requests. -> RESOURCE_EXHAUSTED with a retry hint."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineDraining(EngineError):
    """The engine is shutting down and takes no new requests. -> UNAVAILABLE."""


class AdapterUnavailable(EngineError):
    """The adapter exists but cannot be served (refused at load, quarantined). -> FAILED_PRECONDITION."""


class AdapterBackendUnavailable(AdapterUnavailable):
    """The adapter store's database or object store is unreachable for a cold load. -> UNAVAILABLE."""

    def __init__(self, message: str, retry_after_s: float = 2.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestFailed(EngineError):
    """The request failed inside the engine. -> INTERNAL (message is safe to show)."""


@dataclass(frozen=True)
class GenerationRequest:
    """One request as the engine takes it. Exactly one of prompt / messages is set."""

    request_id: str
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None   # (role, content) pairs
    prompt_token_ids: tuple[int, ...] | None = None        # pre-tokenized (benchmarks, tests)
    adapter_id: str | None = None                          # "name" or "name@3"; None = base
    sampling: SamplingParams = field(default_factory=SamplingParams)
    tenant: str | None = None                              # for tenant-private adapters
    chat: ChatOptions | None = None                        # template options of a chat (tools, kwargs, ...)


@dataclass(frozen=True)
class ValidatedRequest:
    """A request that passed intake (intake.py): defaults filled, its prompt tokenized and checked
    against the limits. The engine queues it without validating it again."""

    request: GenerationRequest
    prompt_ids: list[int]
    # the adapter version whose own tokenizer made prompt_ids (a resized vocabulary); None: the base's
    tokenizer_key: str | None = None


@dataclass(frozen=True)
class Timing:
    queue_s: float = 0.0
    first_token_s: float = 0.0
    total_s: float = 0.0


@dataclass(frozen=True)
class RequestOutput:
    """A delta for one request: new text and tokens since the previous output.

    The last output of a request has `finish_reason` set, plus usage and timing.
    """

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] = ()
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] = ()   # per token: (id, logprob) pairs
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0
    timing: Timing | None = None
    adapter_key: str | None = None
    error: EngineError | None = None      # set when finish_reason is ERROR
    cached_tokens: int = 0                # prompt tokens found in the prefix cache (not recomputed)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class EngineStats:
    """Snapshot exported to metrics after each step."""

    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    num_active_adapters: int
    num_loaded_slots: int
    last_batch_size: int
    last_batch_tokens: int
    total_preemptions: int
    running_adapters: tuple[str, ...] = ()     # adapter keys of running requests ("name@N")
    waiting_adapters: tuple[str, ...] = ()     # adapter keys of waiting requests, oldest first
    max_loras: int = 0
    slot_adapters: tuple[str, ...] = ()        # adapter keys resident in device slots (residency metrics)
    num_cached_blocks: int = 0                 # KV blocks in the prefix cache (held or reclaimable)
    prefix_caching: bool = False

    @property
    def kv_usage(self) -> float:
        used = self.num_total_blocks - self.num_free_blocks
        return used / self.num_total_blocks if self.num_total_blocks else 0.0


@dataclass(frozen=True)
class EngineInfo:
    """What the built engine serves (for Info, metrics and the adapter store)."""

    model: str
    architecture: str
    quantization: str
    dtype: str
    device: str
    base_fingerprint: str
    linear_weight_bytes: int
    base_spec: Any
    vocab_size: int
    linear_kernels: tuple = ()          # layers.linear_choice.KernelChoice per layer shape
    cpu_isa: str = ""                   # the fused CPU kernels' instruction set ("" without them)
    decode_path: str = ""               # "native-stack" (one native call per decode step) or "layers"
    max_prompt_bytes: int = 0           # text longer than this cannot fit max_input_tokens (0 = unknown)
    chat_template: str = ""             # the base model's chat template ("" = none; picks --tool-call-parser auto)


class EngineUnavailable(EngineDraining):
    """The engine process died and is restarting; retry shortly. -> UNAVAILABLE."""
