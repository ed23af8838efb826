"""What the servicers share: config, keys, metrics, and the store and engine once they exist."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from ..config import ServerConfig
from ..metrics import Metrics
from .auth import KeyRing
from .errors import ServiceError


@dataclass
class ServiceState:
    """Set up by the app; `engine` stays None until the model is loaded and warmed up."""

    config: ServerConfig
    keys: KeyRing
    metrics: Metrics | None = None
    store: Any = None            # loraplex.adapters_store AdapterStore
    engine: Any = None           # loraplex.server.engine.async_engine.AsyncEngine
    draining: bool = False

    def require_engine(self) -> Any:
        if self.draining:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another replica")
        if self.engine is None:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly",
                               retry_after_s=1.0)
        return self.engine

    def require_store(self) -> Any:
        if self.store is None:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the adapter store is not open yet")
        return self.store
