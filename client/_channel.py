"""Connection settings shared by Client and AsyncClient: address, key, TLS, defaults."""

from __future__ import annotations

import math

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import grpc

from ._retry import RetryPolicy

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 300.0
ADDRESS_ENV = "LORAPLEX_ADDRESS"
API_KEY_ENV = "LORAPLEX_API_KEY"
MAX_MESSAGE_BYTES = 64 * 2**20
# Routing hint for a Ray Serve gRPC proxy. `loraplex fleet`'s own front end ignores it (it routes
# on the request's adapter, issue 37), as does a plain `loraplex serve`.
ROUTING_METADATA_KEY = "multiplexed_model_id"
REPLICA_METADATA_KEY = "loraplex-replica"


@dataclass(frozen=True)
class ChannelSettings:
    """Everything needed to open the channel and decorate calls. `repr` hides the key."""

    address: str
    api_key: str | None = field(default=None, repr=False)
    tls: bool = False
    root_certificates: bytes | None = field(default=None, repr=False)
    tls_server_name: str | None = None
    timeout_s: float | None = DEFAULT_TIMEOUT_S
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    @classmethod
    def resolve(cls, address: str | None, api_key: str | None, tls: bool,
                root_certificates: bytes | str | Path | None, tls_server_name: str | None,
                timeout: float | None, retry: RetryPolicy | None,
                environ: Mapping[str, str] | None = None) -> "ChannelSettings":
        """Fill unset address/key from LORAPLEX_ADDRESS / LORAPLEX_API_KEY (read now, not at import)."""
        environ = os.environ if environ is None else environ
        if isinstance(root_certificates, (str, Path)):
            root_certificates = Path(root_certificates).expanduser().read_bytes()
        _check_timeout(timeout)
        return cls(address=address or environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS,
                   api_key=api_key if api_key is not None else (environ.get(API_KEY_ENV) or None),
                   tls=tls or root_certificates is not None, root_certificates=root_certificates,
                   tls_server_name=tls_server_name, timeout_s=timeout, retry=retry or RetryPolicy())

    def options(self) -> list[tuple[str, Any]]:
        options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                          ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                          ("grpc.enable_retries", 0)]      # the SDK retries itself
        if self.tls_server_name:
            options.append(("grpc.ssl_target_name_override", self.tls_server_name))
        return options

    def credentials(self) -> grpc.ChannelCredentials | None:
        return grpc.ssl_channel_credentials(root_certificates=self.root_certificates) if self.tls else None

    def metadata(self, adapter_id: str | None = None) -> tuple[tuple[str, str], ...]:
        """The key (when set) and, for generation calls, the adapter id as Ray's routing key."""
        found = (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()
        return found + ((ROUTING_METADATA_KEY, adapter_id),) if adapter_id else found

    def call_timeout(self, timeout: float | None) -> float | None:
        """The per-call timeout: the call's own, else the client's default."""
        return self.timeout_s if timeout is None else _check_timeout(timeout)


def open_sync_channel(settings: ChannelSettings) -> grpc.Channel:
    credentials = settings.credentials()
    if credentials is None:
        return grpc.insecure_channel(settings.address, options=settings.options())
    return grpc.secure_channel(settings.address, credentials, options=settings.options())


def open_aio_channel(settings: ChannelSettings) -> grpc.aio.Channel:
    credentials = settings.credentials()
    if credentials is None:
        return grpc.aio.insecure_channel(settings.address, options=settings.options())
    return grpc.aio.secure_channel(settings.address, credentials, options=settings.options())


def _check_timeout(timeout: float | None) -> float | None:
    """A finite number of seconds > 0, or None (nan and inf would reach gRPC as a deadline)."""
    if timeout is not None and not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be a finite number of seconds > 0, or None, not {timeout!r}")
    return timeout
