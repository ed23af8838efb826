"""What the servicers share: config, keys, metrics, and the store and engine once they exist."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any

import grpc

from ..config import ServerConfig
from ..metrics import Metrics
from .auth import KeyRing
from .errors import ServiceError


REPLICA_METADATA_KEY = "loraplex-replica"


def default_replica_name() -> str:
    """`host-pid` for a plain `loraplex serve`; the fleet sets the Ray Serve replica id."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class ServiceState:
    """Set up by the app; `engine` stays None until the model is loaded and warmed up."""

    config: ServerConfig
    keys: KeyRing
    metrics: Metrics | None = None
    store: Any = None            # loraplex.adapters_store AdapterStore
    engine: Any = None           # loraplex.server.engine.async_engine.AsyncEngine
    draining: bool = False
    replica: str = field(default_factory=default_replica_name)   # `loraplex-replica` trailer

    def replica_trailer(self) -> tuple[tuple[str, str], ...]:
        """The trailing metadata every generation response carries."""
        return ((REPLICA_METADATA_KEY, self.replica),)

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
