"""loraplex.client: Python SDK for the loraplex gRPC server.

    from loraplex.client import Client
    with Client("127.0.0.1:50051") as client:
        print(client.generate("Hello", max_new_tokens=16).text)

Every result is a dataclass from `loraplex.client.types`; every failure is a `LoraplexError`
subclass from `loraplex.client.errors`. `AsyncClient` has the same methods for asyncio.
"""

from ._retry import RetryPolicy
from .async_client import AsyncClient
from .errors import (AdapterNotFoundError, AdapterRejectedError, AlreadyExistsError, AuthenticationError,
                     DeadlineExceededError, LoraplexError, OverloadedError, PermissionDeniedError, ServerError,
                     ServerUnavailableError, ValidationError)
from .sync_client import Client
from .types import (AdapterInfo, AdapterState, FinishReason, Generation, GenerationChunk, HealthStatus, Limits,
                    Sampling, ServerInfo, Timing, ToolCall, Usage)

__all__ = [
    "Client", "AsyncClient", "RetryPolicy",
    "Generation", "GenerationChunk", "FinishReason", "ToolCall", "Usage", "Timing", "Sampling", "AdapterInfo",
    "AdapterState", "ServerInfo", "Limits", "HealthStatus",
    "LoraplexError", "ValidationError", "AdapterNotFoundError", "AdapterRejectedError", "AlreadyExistsError",
    "OverloadedError", "AuthenticationError", "PermissionDeniedError", "ServerUnavailableError",
    "DeadlineExceededError", "ServerError",
]
