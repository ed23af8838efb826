"""Request validation: the one owner of every check on a GenerationRequest.

Each problem is a `Violation` whose field path is relative to `GenerationRequest`:

    ""                    the request's input as a whole (prompt, messages or prompt_token_ids)
    "prompt", "messages", "messages[1].role", "prompt_token_ids"
    "adapter_id", "request_id"
    "sampling.max_new_tokens", "sampling.top_p", "sampling.stop", ...

Every problem of a request is reported at once (`RequestRejected.violations`). API front ends
do not re-check anything: they convert their wire format into a GenerationRequest and map
these paths onto their own wire names (gRPC: service/convert.py `wire_field`; an HTTP front
end writes the same kind of table, e.g. "sampling.top_p" -> "top_p", "messages[1].role" ->
"messages[1].role", "" -> "messages" or "prompt").

`check_request` needs no model (so a front end may call it while the model still loads);
`check_prompt` runs once the prompt is tokenized. `with_defaults` fills unset fields.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

from .config import RequestLimits
from .constraints.spec import ConstraintError, ConstraintLimits
from .io import GenerationRequest, RequestRejected, Violation
from .sequence import MAX_TOP_LOGPROBS, SAMPLING_PENALTY_RANGE as PENALTY_RANGE, SamplingParams

# Use fullmatch: `$` would match before a trailing newline ("name\n" must be refused).
ADAPTER_REF_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}(@[1-9][0-9]{0,8})?", re.ASCII)
CHAT_ROLES = ("system", "user", "assistant", "tool")


def validate_request(request: GenerationRequest, limits: RequestLimits) -> GenerationRequest:
    """The request with defaults filled in; raises RequestRejected listing every problem."""
    violations = check_request(request, limits)
    if violations:
        raise RequestRejected.of(violations)
    return with_defaults(request, limits)


def with_defaults(request: GenerationRequest, limits: RequestLimits) -> GenerationRequest:
    """Fill `sampling.max_new_tokens` when unset: the default, capped at the limit."""
    if request.sampling.max_new_tokens is not None:
        return request
    max_new = min(limits.default_max_new_tokens, limits.max_new_tokens)
    return replace(request, sampling=replace(request.sampling, max_new_tokens=max_new))


def check_request(request: GenerationRequest, limits: RequestLimits) -> list[Violation]:
    """Every problem visible without tokenizing (input shape, adapter id, sampling ranges)."""
    problems = _input_problems(request)
    adapter = request.adapter_id
    if adapter is not None and not ADAPTER_REF_RE.fullmatch(adapter):
        problems.append(Violation("adapter_id", "must be 'name' or 'name@version' with name matching "
                                  "[A-Za-z0-9][A-Za-z0-9._-]{0,127}"))
    problems += _sampling_problems(request.sampling, limits)
    return problems


def check_prompt(request: GenerationRequest, prompt_ids: list[int], limits: RequestLimits,
                 max_model_len: int, vocab_size: int | None) -> list[Violation]:
    """Problems of the tokenized prompt: length limits and token ids. `request` has defaults."""
    num, max_new = len(prompt_ids), request.sampling.max_new_tokens
    if not prompt_ids:
        return [Violation(input_field(request), "the prompt is empty")]
    if num > limits.max_input_tokens:
        return [Violation(input_field(request), f"the prompt has {num} tokens; the limit is {limits.max_input_tokens}")]
    if num + max_new > max_model_len:
        return [Violation("sampling.max_new_tokens", f"prompt ({num}) + max_new_tokens ({max_new}) "
                          f"exceeds the {max_model_len} tokens a request may hold; lower max_new_tokens "
                          "or shorten the prompt")]
    if vocab_size is not None and any(not 0 <= t < vocab_size for t in prompt_ids):
        return [Violation("prompt_token_ids", f"token ids must be in [0, {vocab_size})")]
    return []


def input_field(request: GenerationRequest) -> str:
    """The field that holds the request's input: prompt, messages or prompt_token_ids."""
    if request.messages is not None:
        return "messages"
    return "prompt_token_ids" if request.prompt_token_ids is not None else "prompt"


def _input_problems(request: GenerationRequest) -> list[Violation]:
    given = [name for name in ("prompt", "messages", "prompt_token_ids") if getattr(request, name) is not None]
    if len(given) != 1:
        return [Violation("", "set exactly one of prompt or chat messages")]
    if request.prompt is not None and not request.prompt:
        return [Violation("prompt", "must not be empty")]
    if request.messages is not None:
        return _message_problems(request.messages)
    return []


def _message_problems(messages) -> list[Violation]:
    if not messages:
        return [Violation("messages", "must hold at least one message")]
    problems = []
    for index, message in enumerate(messages):
        if not isinstance(message, (tuple, list)) or len(message) != 2:
            problems.append(Violation(f"messages[{index}]", "must be a (role, content) pair"))
            continue
        role, content = message
        if role not in CHAT_ROLES:
            problems.append(Violation(f"messages[{index}].role",
                                      f"must be one of {', '.join(CHAT_ROLES)} (got {role!r})"))
        if not isinstance(content, str):
            problems.append(Violation(f"messages[{index}].content", "must be a string"))
    return problems


def _sampling_problems(params: SamplingParams, limits: RequestLimits) -> list[Violation]:
    max_new = params.max_new_tokens
    checks = [
        ("max_new_tokens", max_new is None or 1 <= max_new <= limits.max_new_tokens,
         f"must be in [1, {limits.max_new_tokens}] (got {max_new})"),
        ("temperature", math.isfinite(params.temperature) and params.temperature >= 0,
         "must be a finite number >= 0"),
        ("top_p", math.isfinite(params.top_p) and 0 < params.top_p <= 1, "must be in (0, 1]"),
        ("top_k", params.top_k >= 0, "must be >= 0"),
        ("repetition_penalty", PENALTY_RANGE[0] <= params.repetition_penalty <= PENALTY_RANGE[1],
         f"must be in [{PENALTY_RANGE[0]:g}, {PENALTY_RANGE[1]:g}] (further out, logits overflow float32)"),
        ("seed", params.seed is None or 0 <= params.seed < 2**63, "must be in [0, 2**63)"),
        ("stop", len(params.stop) <= limits.max_stop_sequences,
         f"at most {limits.max_stop_sequences} stop sequences (got {len(params.stop)})"),
        ("stop", all(isinstance(s, str) and s for s in params.stop), "stop sequences must not be empty"),
        ("stop_token_ids", all(t >= 0 for t in params.stop_token_ids), "must be >= 0"),
        *_openai_checks(params, limits),
    ]
    return [Violation(f"sampling.{name}", message) for name, ok, message in checks if not ok] + \
        _constraint_problems(params, limits)


def _constraint_problems(params: SamplingParams, limits: RequestLimits) -> list[Violation]:
    """A structured-output constraint's shape and size (compiling it finds the rest)."""
    if params.constraint is None:
        return []
    problems = []
    ends = "the constraint ends the output with an end-of-sequence token"
    if params.ignore_eos:
        problems.append(Violation("sampling.ignore_eos", f"cannot be combined with a constraint ({ends})"))
    if params.min_tokens:
        problems.append(Violation("sampling.min_tokens", f"cannot be combined with a constraint ({ends}, "
                                  "which min_tokens would block)"))
    try:
        params.constraint.check(ConstraintLimits(max_source_bytes=limits.max_constraint_bytes))
    except ConstraintError as error:
        problems.append(Violation("sampling.constraint", str(error)))
    return problems


def _openai_checks(params: SamplingParams, limits: RequestLimits) -> list[tuple[str, bool, str]]:
    """presence / frequency penalties, min_tokens, top_logprobs (penalties.py, top_logprobs.py)."""
    max_new = params.max_new_tokens
    if max_new is None:
        max_new = min(limits.default_max_new_tokens, limits.max_new_tokens)
    return [
        ("presence_penalty", math.isfinite(params.presence_penalty) and -2 <= params.presence_penalty <= 2,
         "must be in [-2, 2]"),
        ("frequency_penalty", math.isfinite(params.frequency_penalty) and -2 <= params.frequency_penalty <= 2,
         "must be in [-2, 2]"),
        ("min_tokens", 0 <= params.min_tokens <= max_new, f"must be in [0, max_new_tokens] (max_new_tokens is {max_new})"),
        ("top_logprobs", 0 <= params.top_logprobs <= MAX_TOP_LOGPROBS, f"must be in [0, {MAX_TOP_LOGPROBS}]"),
    ]
