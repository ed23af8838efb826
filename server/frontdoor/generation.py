"""Generation admission, the same for every transport: who may generate, how many engine
requests one request may become (checked from its shape, before any is built), and the
engine's own checks before anything waits in its queue."""

from __future__ import annotations

from typing import Any

from ..engine.io import GenerationRequest, RequestRejected
from ..engine.validation import check_request
from .access import Operation, Principal, authorize
from .door import FrontDoor


def admit(door: FrontDoor, principal: Principal | None, num_prompts: int = 1, n: int = 1) -> Principal:
    """The caller, once it may generate `num_prompts` x `n` completions in one request."""
    caller = authorize(principal, Operation.GENERATE)
    door.limits.check_choices(num_prompts, n)
    return caller


def check(request: GenerationRequest, limits: Any) -> GenerationRequest:
    """The request when the engine's validator accepts it (RequestRejected listing every problem)."""
    violations = check_request(request, limits)
    if violations:
        raise RequestRejected.of(violations)
    return request
