"""What the servicers share: config, keys, metrics, and the store and engine once they exist."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any

from ..config import ServerConfig
from ..frontdoor import FrontDoor
from ..metrics import Metrics
from .auth import KeyRing


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
    door: FrontDoor = field(init=False, repr=False)              # the transport-neutral layer

    def __post_init__(self) -> None:
        self.door = FrontDoor(self)

    def replica_trailer(self) -> tuple[tuple[str, str], ...]:
        """The trailing metadata every generation response carries."""
        return ((REPLICA_METADATA_KEY, self.replica),)

    def require_engine(self) -> Any:
        """The EngineClient (a Refusal of kind UNAVAILABLE while loading or draining)."""
        return self.door.engine()

    def require_store(self) -> Any:
        return self.door.store()
