"""Start-time checks of a ServerConfig: one line per problem, naming the flag to fix.

The engine's settings are checked once, by the engine's own config (engine/config.py);
this module maps each of its problems onto the flag that sets the field, and adds the checks
of the server's own settings (ports, keys, TLS, store limits).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

from .problems import InvalidConfig

MiB = 2**20


class Flag(Protocol):
    """What the checks read of a config.Flag (config.py imports this module, never the reverse)."""

    @property
    def flag(self) -> str: ...

    @property
    def engine(self) -> str | None: ...


class ServerConfig(Protocol):
    """What the checks read of a config.ServerConfig (structurally: config.py is not imported)."""

    model: str
    revision: str
    port: int
    metrics_port: int
    http_port: int
    served_model_name: str
    api_keys: tuple[Any, ...]
    admin_keys: tuple[Any, ...]
    tls_cert: str | None
    tls_key: str | None
    log_level: str
    max_message_bytes: int
    max_request_choices: int
    metrics_adapter_labels: int
    grace_period_s: float
    host_cache_bytes: int
    adapter_quota_bytes: int
    max_adapter_bytes: int
    blob_cache_bytes: int
    allowed_register_roots: tuple[str, ...]
    adapter_sources: tuple[str, ...]
    store_registry: str
    store_blobs: str
    http_max_connections: int
    http_header_timeout_s: float
    http_body_timeout_s: float

    def engine_config(self, model_dir: Path) -> Any: ...
_WORD_RE = re.compile(r"\b[a-z][a-z_]*\b")


def validate(config: ServerConfig, flags: Sequence[Flag]) -> Iterator[str]:
    """Yield one line per problem, naming the flag to fix."""
    yield from _engine_problems(config, flags)
    yield from _validate_model(config)
    for name in ("port", "metrics_port", "http_port"):
        if not 0 <= getattr(config, name) <= 65535:
            yield f"--{name.replace('_', '-')} must be in [0, 65535]"
    if config.port and config.port == config.metrics_port:
        yield "--port and --metrics-port must differ"
    if config.http_port and config.http_port in (config.port, config.metrics_port):
        yield "--http-port must differ from --port and --metrics-port"
    if config.served_model_name and "@" in config.served_model_name:
        yield "--served-model-name must not contain '@' (it marks adapter versions)"
    yield from _validate_limits(config)
    yield from _validate_security(config)
    for root in config.allowed_register_roots:
        if not Path(root).expanduser().is_dir():
            yield f"--allowed-register-root {root!r} is not an existing directory"
    yield from _validate_store(config)
    if config.log_level.lower() not in ("debug", "info", "warning", "error"):
        yield "--log-level must be debug, info, warning or error"


def _validate_model(config: ServerConfig) -> Iterator[str]:
    from .model.hub import is_hub_id

    hub = is_hub_id(config.model)
    if config.model != "default" and not hub and not (Path(config.model).expanduser() / "config.json").is_file():
        yield (f"--model {config.model!r}: not a Hugging Face directory with config.json, a Hub id "
               "(org/name), or 'default'")
    if config.revision and not hub:
        yield "--revision applies only to a Hub --model (org/name)"


def _validate_store(config: ServerConfig):
    from ..adapters_store.backends import check_urls
    from ..adapters_store.urls import parse_s3_url

    yield from check_urls(config.store_registry, config.store_blobs)
    for source in config.adapter_sources:
        try:
            parse_s3_url(source)
        except ValueError as error:
            yield f"--adapter-source: {error}"
    if config.blob_cache_bytes < 0:
        yield "--blob-cache-bytes must be >= 0"


def _engine_problems(config: ServerConfig, flags: Sequence[Flag]) -> Iterator[str]:
    """EngineConfig's problems, with each engine setting name replaced by its flag."""
    flag_of = {flag.engine: flag.flag for flag in flags if flag.engine}
    try:
        config.engine_config(Path("."))
    except InvalidConfig as error:
        for problem in error.problems:
            setting = problem.path.rpartition(".")[2]
            message = _WORD_RE.sub(lambda m: flag_of.get(m.group(), m.group()), problem.message)
            yield f"{flag_of.get(setting, problem.path)} {message}"


def _validate_limits(config: ServerConfig) -> Iterator[str]:
    for name in ("host_cache_bytes", "adapter_quota_bytes", "max_adapter_bytes", "max_request_choices"):
        if getattr(config, name) < 1:
            yield f"--{name.replace('_', '-')} must be >= 1 (got {getattr(config, name)})"
    if config.metrics_adapter_labels < 0:
        yield "--metrics-adapter-labels must be >= 0"
    if config.max_message_bytes < 2 * MiB:
        yield "--max-message-bytes must be >= 2MiB (uploads send 1 MiB chunks)"
    if not (math.isfinite(config.grace_period_s) and config.grace_period_s >= 0):
        yield "--grace-period must be a number of seconds >= 0"
    if config.http_max_connections < 0:
        yield "--http-max-connections must be >= 0 (0: half the file-descriptor limit)"
    for flag, seconds in (("--http-header-timeout", config.http_header_timeout_s),
                          ("--http-body-timeout", config.http_body_timeout_s)):
        if not (math.isfinite(seconds) and seconds > 0):
            yield f"{flag} must be a number of seconds > 0"


def _validate_security(config: ServerConfig) -> Iterator[str]:
    for flag, keys in (("--api-key", config.api_keys), ("--admin-key", config.admin_keys)):
        if any(len(key.secret) < 8 for key in keys):
            yield f"{flag}: keys must be at least 8 characters"
    overlap = {k.secret for k in config.api_keys} & {k.secret for k in config.admin_keys}
    if overlap:
        yield "the same key is configured as both --api-key and --admin-key"
    if bool(config.tls_cert) != bool(config.tls_key):
        yield "TLS needs both --tls-cert and --tls-key"
    for flag, path in (("--tls-cert", config.tls_cert), ("--tls-key", config.tls_key)):
        if path and not Path(path).expanduser().is_file():
            yield f"{flag} {path!r} is not a readable file"
