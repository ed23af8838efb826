"""Errors of the HTTP API in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

`to_api_error` maps every error a handler can meet to an HTTP status through the front door's
`refusal_of` (the same rules as gRPC); unknown errors become 500 with an incident id
(traceback logged, never sent).
Engine validation errors (engine/validation.py) name fields relative to the engine's
GenerationRequest (`sampling.max_new_tokens`, `""` for the input, `messages[1].role`);
`engine_param` maps them to the OpenAI parameter that set them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from starlette.responses import JSONResponse

from ..engine.io import RequestRejected
from ..frontdoor.errors import Kind, refusal_of

log = logging.getLogger("loraplex.http")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error", 422: "invalid_request_error",
          408: "invalid_request_error", 429: "rate_limit_error", 500: "internal_error", 503: "service_unavailable",
          507: "internal_error"}

# engine field (last path component) -> OpenAI parameter
PARAM_NAMES = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p",
               "top_k": "top_k", "repetition_penalty": "repetition_penalty", "seed": "seed", "stop": "stop",
               "stop_token_ids": "stop_token_ids", "presence_penalty": "presence_penalty",
               "frequency_penalty": "frequency_penalty", "min_tokens": "min_tokens",
               "top_logprobs": "top_logprobs", "adapter_id": "model", "chat": "messages", "messages": "messages",
               "constraint": "response_format", "ignore_eos": "ignore_eos"}


@dataclass
class ApiError(Exception):
    """An error answered as `status` with OpenAI's error body."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(param: str | None, message: str) -> ApiError:
    return ApiError(400, message, param=param)


def body_too_large(message: str, close: bool = False) -> ApiError:
    """413. close: the connection closes after the answer, the rest of the body is never read
    (else it is read and dropped, up to connections.py's bound, so that a client that sends its
    whole body before reading gets the answer and keeps its connection)."""
    return ApiError(413, message, headers={"Connection": "close"} if close else {})


def too_large_to_drain(declared: int, limit: int) -> bool:
    """A body declared this long is refused with the connection closed: dropping its unread rest
    could take more than the 2 x `limit` bytes connections.py drops (server.py start_asgi)."""
    return declared > 2 * limit


def unsupported(param: str, detail: str = "") -> ApiError:
    extra = f" ({detail})" if detail else ""
    return ApiError(400, f"the parameter '{param}' is not supported by this server yet{extra}; "
                         f"remove it from the request", param=param, code="unsupported_parameter")


def engine_param(field_name: str, prompt_param: str) -> str:
    """Engine field path (engine/validation.py: 'sampling.top_p', '' = the input, 'prompt',
    'messages[1].role', 'adapter_id') -> the OpenAI parameter that set it."""
    head = field_name.split(".", 1)[0].split("[", 1)[0]
    if head in ("", "prompt", "prompt_token_ids", "input"):
        return prompt_param
    if head == "messages":
        return field_name.replace("[", ".").replace("]", "")
    last = field_name.split(".")[-1]
    return PARAM_NAMES.get(last, last)


# The front door's kinds (frontdoor/errors.py) -> HTTP statuses: the only HTTP-specific rule.
KIND_STATUS = {Kind.INVALID: 400, Kind.UNAUTHENTICATED: 401, Kind.PERMISSION_DENIED: 403, Kind.NOT_FOUND: 404,
               Kind.CONFLICT: 409, Kind.PRECONDITION: 409, Kind.TOO_LARGE: 413, Kind.BUSY: 429,
               Kind.DISK_FULL: 507, Kind.UNAVAILABLE: 503, Kind.INTERNAL: 500}


def to_api_error(error: BaseException, prompt_param: str = "prompt", params: dict[str, str] | None = None) -> ApiError:
    """The HTTP status and body for an error raised while serving a request. `params` renames
    the front door's neutral field names for this route (e.g. adapter_id -> lora_name)."""
    if isinstance(error, ApiError):
        return error
    from_service = _from_service(error)
    if from_service is not None:
        return from_service
    refusal = refusal_of(error)
    status = KIND_STATUS[refusal.kind]
    param = None
    if refusal.field is not None and refusal.field != "body":
        param = (params or {}).get(refusal.field) or engine_param(refusal.field, prompt_param)
    elif refusal.code in ("model_not_found", "adapter_unavailable"):
        param = "model"
    message = error.message if isinstance(error, RequestRejected) else refusal.message
    headers = {}
    if refusal.retry_after_s is not None and refusal.kind in (Kind.BUSY, Kind.UNAVAILABLE):
        headers["Retry-After"] = str(max(1, round(refusal.retry_after_s)))
    elif refusal.kind is Kind.UNAVAILABLE:
        headers["Retry-After"] = "1"
    return ApiError(status, message, param=param, code=refusal.code, headers=headers)


def _from_service(error: BaseException) -> ApiError | None:
    """A gRPC-side ServiceError (e.g. the fleet front end's admission) -> HTTP."""
    from ..service.errors import ServiceError

    if not isinstance(error, ServiceError):
        return None
    import grpc

    status = {grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.INVALID_ARGUMENT: 400,
              grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.PERMISSION_DENIED: 403,
              grpc.StatusCode.RESOURCE_EXHAUSTED: 429}.get(error.code, 500)
    headers = {"Retry-After": str(max(1, round(error.retry_after_s)))} if error.retry_after_s else {}
    param = error.violations[0].field if error.violations else None
    return ApiError(status, error.message, param=param, headers=headers)
