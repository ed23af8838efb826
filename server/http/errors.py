"""Errors of the HTTP API in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

`to_api_error` maps every error a handler can meet (engine, store, gRPC-side ServiceError) to
an HTTP status; unknown errors become 500 with an incident id (traceback logged, never sent).
Engine validation errors (engine/validation.py) name fields relative to the engine's
GenerationRequest (`sampling.max_new_tokens`, `""` for the input, `messages[1].role`);
`engine_param` maps them to the OpenAI parameter that set them.
"""

from __future__ import annotations

import errno
import logging
import uuid
from dataclasses import dataclass, field

from starlette.responses import JSONResponse

from ..service.errors import is_store_unavailable, store_unavailable_message
from ..engine.io import AdapterBackendUnavailable, AdapterUnavailable, EngineDraining, QueueFull, RequestFailed, RequestRejected

log = logging.getLogger("loraplex.http")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 500: "internal_error", 503: "service_unavailable"}

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


def to_api_error(error: BaseException, prompt_param: str = "prompt") -> ApiError:
    """The HTTP status and body for an error raised while serving a request."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, RequestRejected):
        return bad_request(engine_param(error.field_name, prompt_param), error.message)
    if isinstance(error, QueueFull):
        seconds = max(1, round(error.retry_after_s))
        return ApiError(429, str(error), code="queue_full", headers={"Retry-After": str(seconds)})
    if isinstance(error, EngineDraining):
        return ApiError(503, str(error) or "the server is shutting down", headers={"Retry-After": "1"})
    if isinstance(error, AdapterBackendUnavailable) or is_store_unavailable(error):
        seconds = max(1, round(getattr(error, "retry_after_s", 1.0)))
        return ApiError(503, store_unavailable_message(error), code="store_unavailable",
                        headers={"Retry-After": str(seconds)})
    if isinstance(error, AdapterUnavailable):
        return ApiError(400, str(error), param="model", code="adapter_unavailable")
    if isinstance(error, RequestFailed):
        return ApiError(500, str(error) or "the request failed", code="request_failed")
    mapped = _from_store(error) or _from_service(error)
    if mapped is not None:
        return mapped
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        log.error("disk full: %s", error)
        return ApiError(507, "the server's disk is full; nothing was stored (an operator must free space)")
    incident = uuid.uuid4().hex[:12]
    log.error("internal error (incident %s)", incident, exc_info=error)
    return ApiError(500, f"internal server error (incident {incident})", code="internal_error")


def _from_store(error: BaseException) -> ApiError | None:
    if not type(error).__module__.startswith("loraplex.adapters_store"):
        return None
    from ...adapters_store import errors as store

    table = ((store.InvalidAdapterId, 400, "model"), (store.AdapterValidationError, 400, None),
             (store.AdapterNotFound, 404, "model"), (store.QuotaExceeded, 413, None),
             (store.UploadConflict, 409, None), (store.PermissionDenied, 403, None),
             (store.IntegrityError, 409, None))
    for error_type, status, param in table:
        if isinstance(error, error_type):
            code = "model_not_found" if status == 404 else None
            return ApiError(status, str(error), param=param, code=code)
    return None


def _from_service(error: BaseException) -> ApiError | None:
    """A gRPC-side ServiceError (e.g. from ServiceState.require_engine) -> HTTP."""
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
