"""Ray for `loraplex fleet`: a local cluster on loopback when the fleet is, token auth kept on
(Ray 2.60's default; tests turn it off with RAY_AUTH_MODE=disabled), its token file 0600."""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path

from ..config import ServerConfig
from .config import FleetOptions


# Ray Serve settings for the fleet's processes (read by each Ray process at import): user code
# and the router on the replica's own event loop, no thread hop per call or stream item (the
# fleet-of-one ratio, BENCHMARKS.md section 9). A local cluster gets them from `loraplex fleet`;
# set them on the nodes of a cluster the fleet joins (deploy/rayservice.yaml does).
SERVE_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}


def apply_serve_env(environ=os.environ) -> None:
    """Put SERVE_ENV into `environ` (values already set win) before a local cluster starts."""
    for name, value in SERVE_ENV.items():
        environ.setdefault(name, value)


def token_path() -> Path:
    """Where Ray keeps its auth token (RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token)."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def secure_token_file(path: Path | None = None) -> bool:
    """Make Ray's token file readable by its owner only (Ray writes it 0644). True if changed."""
    path = path or token_path()
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return False
    if mode & 0o077:
        path.chmod(0o600)
        return True
    return False


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def init_ray(config: ServerConfig, options: FleetOptions) -> None:
    """Connect to --ray-address or start a local cluster (its node address on loopback when
    --host is)."""
    import ray

    if ray.is_initialized():
        return
    secure_token_file()
    if not options.ray_address:
        apply_serve_env()
    extra = {}
    if not options.ray_address and is_loopback(config.host):
        extra["_node_ip_address"] = "127.0.0.1"
    ray.init(address=options.ray_address or None, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=True, **extra)
    secure_token_file()                 # a token Ray generated just now
