"""Ray for `loraplex fleet`: a local cluster on loopback when the fleet is (every Ray port), token
auth kept on (Ray 2.60's default; tests turn it off with RAY_AUTH_MODE=disabled), its token file
0600 from the start."""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
from pathlib import Path

from ..config import ServerConfig
from .config import FleetOptions


SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


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


def provision_token(path: Path | None = None) -> bool:
    """Before Ray starts a local cluster with token auth: create the token file readable by its
    owner only from the first byte (Ray would write it 0644 and we could only tighten it after).
    Nothing when auth is off (RAY_AUTH_MODE=disabled), a token is given (RAY_AUTH_TOKEN) or the
    file exists. True if created."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token" or os.environ.get("RAY_AUTH_TOKEN"):
        return False
    path = path or token_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32))            # what Ray's own generator writes: 256 random bits
    return True


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def single_node_on_loopback() -> None:
    """Make the local cluster's node address 127.0.0.1, so that every Ray process listens on
    loopback only (GCS, raylet, workers, dashboard agent, metrics export, runtime-env agent).

    `ray.init(_node_ip_address="127.0.0.1")` does not do it: Ray replaces a loopback address by
    the machine's routable one, and its servers then listen on all interfaces. Ray's
    single-node switch (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, what it uses on macOS and Windows)
    makes it pick 127.0.0.1. Set in the environment for the processes Ray starts, and on this
    process's copy, which Ray read at import (Ray is pinned, pyproject.toml)."""
    from ray._private import ray_constants

    os.environ[SINGLE_NODE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def keep_serve_grpc_on_loopback() -> None:
    """Call in a Serve replica's constructor. After it, Ray Serve starts an inter-deployment gRPC
    server in the replica on `[::]:0` (all interfaces; hard-coded in Ray 2.60's
    serve/_private/replica.py, no setting), which the fleet does not use (its handles make actor
    calls). On a node whose address is loopback (a local fleet), that server binds loopback too;
    elsewhere (KubeRay) it stays as Ray has it, behind Ray's token auth and the NetworkPolicy."""
    import ray
    from ray.serve._private import replica as serve_replica

    bind = serve_replica.add_port_to_grpc_server
    if getattr(bind, "loraplex_loopback", False) or not is_loopback(ray.util.get_node_ip_address()):
        return

    def on_loopback(server, address: str):
        host, _, port = address.rpartition(":")
        return bind(server, f"127.0.0.1:{port}" if host in ("[::]", "0.0.0.0") else address)

    on_loopback.loraplex_loopback = True
    serve_replica.add_port_to_grpc_server = on_loopback


def init_ray(config: ServerConfig, options: FleetOptions) -> None:
    """Connect to --ray-address or start a local cluster (on loopback when --host is)."""
    import ray

    if ray.is_initialized():
        return
    secure_token_file()
    extra = {}
    if not options.ray_address:
        provision_token()
        if is_loopback(config.host):
            single_node_on_loopback()
    ray.init(address=options.ray_address or None, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=True, **extra)
    secure_token_file()                 # a token Ray generated just now
