"""FleetOptions: the settings `loraplex fleet` adds to `loraplex serve`'s (flag > env > default).

Every serve setting applies to each replica's engine and store; `--host`, `--port` and
`--http-port` are the fleet front end's and `--metrics-port` each replica's /metrics (see docs/fleet.md).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from ..config import ConfigError, Flag, ServerConfig, load_server_config


def _optional_int(text: Any) -> int | None:
    return None if str(text).strip() in ("", "none") else int(text)


FLEET_FLAGS: tuple[Flag, ...] = (
    Flag("replicas", "--replicas", int, "fixed number of replicas (default 1; see --min/--max-replicas)"),
    Flag("min_replicas", "--min-replicas", _optional_int, "autoscaling: fewest replicas (with --max-replicas)"),
    Flag("max_replicas", "--max-replicas", _optional_int, "autoscaling: most replicas (with --min-replicas)"),
    Flag("target_ongoing_requests", "--target-ongoing-requests", float,
         "autoscaling: in-flight requests per replica that Ray aims for"),
    Flag("replica_cpus", "--replica-cpus", float, "CPUs Ray reserves for each replica (fractions allowed)"),
    Flag("replica_gpus", "--replica-gpus", float, "GPUs Ray reserves for each replica (fractions allowed)"),
    Flag("ray_address", "--ray-address", str, "join this Ray cluster ('auto', 'host:6379', 'ray://...'); "
                                              "default: start a local one"),
    Flag("max_adapters_per_replica", "--max-adapters-per-replica", _optional_int,
         "adapters the router counts as held by a replica (default: --max-loras, its device slots)"),
    Flag("max_ongoing_requests", "--max-ongoing-requests", _optional_int,
         "requests Ray sends one replica at once (default: --max-num-seqs)"),
    Flag("app_name", "--app-name", str, "Ray Serve application name"),
)


@dataclass(frozen=True)
class FleetOptions:
    """Validated fleet settings (the replicas' own settings are a ServerConfig)."""

    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float = 8.0
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    ray_address: str = ""
    max_adapters_per_replica: int | None = None
    max_ongoing_requests: int | None = None
    app_name: str = "loraplex"

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    def adapters_per_replica(self, config: ServerConfig) -> int:
        return self.max_adapters_per_replica or config.max_loras

    def ongoing_requests(self, config: ServerConfig) -> int:
        return self.max_ongoing_requests or config.max_num_seqs


def validate(options: FleetOptions, config: ServerConfig) -> list[str]:
    """One line per problem."""
    problems = []
    if options.replicas < 1:
        problems.append("--replicas must be >= 1")
    if options.autoscaling:
        low, high = options.min_replicas, options.max_replicas
        if low is None or high is None:
            problems.append("autoscaling needs both --min-replicas and --max-replicas")
        elif not 0 <= low <= high or high < 1:
            problems.append("need 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1")
    if options.target_ongoing_requests <= 0:
        problems.append("--target-ongoing-requests must be > 0")
    if options.replica_cpus < 0 or options.replica_gpus < 0:
        problems.append("--replica-cpus and --replica-gpus must be >= 0")
    for name in ("max_adapters_per_replica", "max_ongoing_requests"):
        value = getattr(options, name)
        if value is not None and value < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1")
    return problems


def _tls_problems(cli_values: Mapping[str, Any], environ: Mapping[str, str]) -> list[str]:
    if any(cli_values.get(name) or environ.get(env) for name, env in
           (("tls_cert", "LORAPLEX_TLS_CERT"), ("tls_key", "LORAPLEX_TLS_KEY"))):
        return ["--tls-cert/--tls-key: the fleet's front end has no TLS yet; terminate TLS in front of the fleet "
                "(ingress or load balancer)"]
    return []


def load_fleet_config(cli_values: Mapping[str, Any], environ: Mapping[str, str]) -> tuple[ServerConfig, FleetOptions]:
    """The replicas' ServerConfig and the FleetOptions; ConfigError lists every problem."""
    fleet_names = {flag.name for flag in FLEET_FLAGS}
    problems = _tls_problems(cli_values, environ)
    try:
        config = load_server_config({k: v for k, v in cli_values.items() if k not in fleet_names}, environ)
    except ConfigError as error:
        problems += error.problems
        config = None
    values: dict[str, Any] = {}
    for flag in FLEET_FLAGS:
        raw = cli_values.get(flag.name)
        source = flag.flag
        if raw is None:
            raw, source = environ.get(flag.env_name), flag.env_name
        if raw is None:
            continue
        try:
            values[flag.name] = flag.parse(raw) if not isinstance(raw, str) or flag.parse is not int else int(raw.strip())
        except (TypeError, ValueError) as error:
            problems.append(f"{source}: {error}")
    options = FleetOptions(**values)
    if config is not None:
        problems += validate(options, config)
    if problems:
        raise ConfigError(problems)
    return config, options


def add_fleet_arguments(parser) -> None:
    """The fleet's own flags (serve's are added by server.config.add_arguments)."""
    known = {field.name for field in fields(FleetOptions)}
    for flag in FLEET_FLAGS:
        assert flag.name in known, flag.name
        parser.add_argument(flag.flag, dest=flag.name, default=None, metavar=flag.name.upper(),
                            help=f"{flag.help} (env {flag.env_name})")
