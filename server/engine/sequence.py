"""Per-request state shared by the scheduler, the runner and the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from .constraints.spec import Constraint


MAX_TOP_LOGPROBS = 20                  # alternatives per token, as OpenAI allows


class SequenceStatus(enum.Enum):
    WAITING = "waiting"        # queued, or preempted and waiting to be recomputed
    RUNNING = "running"        # holds KV blocks and takes part in steps
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    LENGTH = "length"          # max_new_tokens or the context limit
    EOS = "eos"                # the model's end-of-sequence token
    STOP = "stop"              # a stop string or a stop token id
    ABORT = "abort"            # cancelled by the client or the server
    ERROR = "error"            # failed inside the engine


# Finite is not enough: logits / 1e-50 (or * 1e300) overflow float32 to inf and NaN.
SAMPLING_PENALTY_RANGE = (1e-2, 1e2)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. temperature == 0 means greedy.

    Checked at the engine boundary (validation.py); max_new_tokens None = the engine's
    default (RequestLimits.default_max_new_tokens, capped at the limit), filled in there.
    """

    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0                      # 0 = disabled
    repetition_penalty: float = 1.0     # 1 = disabled
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    # OpenAI-style extras (server/engine/penalties.py, top_logprobs.py)
    presence_penalty: float = 0.0       # subtracted once from every token already generated
    frequency_penalty: float = 0.0      # subtracted per occurrence in the generated tokens
    min_tokens: int = 0                 # EOS and stop token ids are masked until this many tokens
    top_logprobs: int = 0               # alternatives returned per token (implies logprobs)
    constraint: Constraint | None = None   # structured output (JSON Schema, regex, ...); None = free
    # False: special tokens are part of the text (tool-call markers that a tokenizer holds as
    # special tokens, e.g. Mistral's [TOOL_CALLS]), except the EOS / stop token id that ends it
    skip_special_tokens: bool = True

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def returns_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0


@dataclass(eq=False)
class Sequence:
    """One request inside the engine. Mutated only by the scheduler (and the engine on finish).

    `num_computed_tokens` counts tokens whose K/V are in the cache; the tokens to compute
    next are `all_token_ids[num_computed_tokens:]`. After preemption it drops to 0 and the
    sequence recomputes its prompt plus the tokens generated so far.
    """

    seq_id: int
    prompt_token_ids: list[int]
    sampling: SamplingParams
    adapter_key: str | None = None      # resolved adapter ("name@version"), None = base only
    arrival_time: float = 0.0
    eos_token_ids: tuple[int, ...] = ()
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[tuple[tuple[int, float], ...]] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    guide: Any = None                   # constraints.compiler.Guide of a constrained request
    # Prefix caching (block_manager.py): chained hashes of this sequence's full blocks so far,
    # how many blocks of block_table were offered to the cache, and how many prompt tokens the
    # first admission found cached (reported in usage).
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered_blocks: int = 0
    num_cached_tokens: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def tokens_between(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without building the whole list."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]

    def token_at(self, index: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[index] if index < n else self.output_token_ids[index - n]
