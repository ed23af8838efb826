"""Typed results of the loraplex SDK: plain dataclasses and string enums, never protobufs."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Mapping, Sequence, TypedDict, Union


class _StrEnum(str, enum.Enum):
    """A str-valued enum that prints as its value (enum.StrEnum needs Python 3.11)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class FinishReason(_StrEnum):
    """Why generation stopped; `None` on stream chunks that are not the last."""

    LENGTH = "length"   # max_new_tokens or the context limit was reached
    EOS = "eos"         # the model produced its end-of-sequence token
    STOP = "stop"       # a stop sequence or stop token id matched
    TOOL_CALLS = "tool_calls"   # the model ended after calling tools (see `tool_calls`)


class HealthStatus(_StrEnum):
    """The grpc.health.v1 serving status of the server."""

    UNKNOWN = "UNKNOWN"
    SERVING = "SERVING"
    NOT_SERVING = "NOT_SERVING"
    SERVICE_UNKNOWN = "SERVICE_UNKNOWN"


class AdapterState(_StrEnum):
    UNSPECIFIED = "unspecified"
    READY = "ready"
    QUARANTINED = "quarantined"   # failed an integrity check on load
    DELETING = "deleting"


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    generated_tokens: int
    cached_tokens: int = 0      # prompt tokens the server found in its prefix cache


@dataclass(frozen=True)
class Timing:
    """Server-side latencies in seconds, measured from the request's arrival."""

    queue_seconds: float
    first_token_seconds: float
    total_seconds: float


@dataclass(frozen=True)
class ToolCall:
    """A function call the model made; answer it with {"role": "tool", "tool_call_id": id, "content": ...}."""

    id: str
    name: str
    arguments: str                        # a JSON object's text

    def parsed_arguments(self) -> dict:
        import json

        return json.loads(self.arguments)


@dataclass(frozen=True)
class Generation:
    """The whole result of `generate` / `chat`."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    usage: Usage
    timing: Timing
    adapter_id: str | None                # resolved "name@version"; None for the base model
    logprobs: list[float] | None = None   # one per token id when requested
    top_logprobs: list[list[tuple[int, float]]] | None = None   # per token: (token id, logprob), best first
    replica: str | None = None            # the server's `loraplex-replica` trailer (fleet: which replica)
    tool_calls: list[ToolCall] = field(default_factory=list)   # chat with tools: the calls found
    reasoning_content: str | None = None  # the server's --reasoning-parser: reasoning moved out of text


@dataclass(frozen=True)
class GenerationChunk:
    """One streamed delta; the last chunk carries finish_reason, usage and timing."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    timing: Timing | None = None
    adapter_id: str | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)   # calls completed with this chunk
    reasoning_content: str | None = None


@dataclass(frozen=True)
class AdapterInfo:
    """One stored adapter version. `versions` (all versions of the name) is filled by get_adapter."""

    adapter_id: str
    version: int
    sha256: str
    size_bytes: int
    rank: int
    lora_alpha: float
    use_rslora: bool
    target_modules: list[str]
    dtype: str
    peft_type: str
    base_model: str
    base_fingerprint: str
    owner: str | None                     # tenant; None = public
    created_at: datetime | None
    state: AdapterState
    versions: list[int] = field(default_factory=list)
    has_chat_template: bool = False       # the adapter carries its own chat template
    vocab_size: int | None = None         # a resized vocabulary's size (its own tokenizer); None: the base's

    @property
    def ref(self) -> str:
        """The pinned reference, "name@version", usable as `adapter_id` in generate."""
        return f"{self.adapter_id}@{self.version}"


@dataclass(frozen=True)
class Limits:
    max_input_tokens: int
    max_total_tokens: int
    max_new_tokens: int
    max_stop_sequences: int
    max_queued_requests: int
    max_loras: int
    max_lora_rank: int
    max_message_bytes: int
    max_adapter_bytes: int


@dataclass(frozen=True)
class ServerInfo:
    version: str
    model: str
    architecture: str
    quantization: str
    dtype: str
    base_fingerprint: str
    limits: Limits
    auth_enabled: bool
    device: str
    linear_weight_bytes: int
    linear_kernels: tuple[str, ...] = ()     # kernel per linear layer shape (server's choice)
    cpu_isa: str = ""
    decode_path: str = ""        # "native-stack" or "layers" (how decode-only steps run)


class Sampling(TypedDict, total=False):
    """Sampling keyword arguments of generate/chat (unset ones take the server's defaults)."""

    max_new_tokens: int
    temperature: float            # 0 = greedy
    top_p: float                  # (0, 1]
    top_k: int                    # 0 = disabled
    repetition_penalty: float     # > 0; 1 = off
    seed: int                     # same seed => same tokens
    stop: Sequence[str]           # stop sequences; never included in the output
    stop_token_ids: Sequence[int]
    ignore_eos: bool
    logprobs: bool                # return the log-probability of each chosen token
    top_logprobs: int             # [0, 20] most likely alternatives per token (implies logprobs)
    presence_penalty: float       # [-2, 2]; OpenAI semantics over generated tokens
    frequency_penalty: float      # [-2, 2]
    min_tokens: int               # EOS / stop token ids blocked until this many tokens
    skip_special_tokens: bool     # default True; False keeps special tokens in the text
    # structured output: at most one of these (docs/structured-output.md)
    json_schema: Union[Mapping[str, Any], str]   # a JSON Schema (dict or JSON text)
    json_object: bool             # True: any JSON object
    regex: str                    # the whole output matches this regular expression
    choice: Sequence[str]         # the output is exactly one of these strings
    grammar: str                  # a Lark grammar (llguidance dialect) with a `start` rule


ChatMessage = Union[Mapping[str, str], tuple[str, str]]   # {"role": ..., "content": ...} or (role, content)
ProgressCallback = Callable[[int, int], None]              # (bytes sent, bytes total)
