"""The `loraplex` console script: dispatches to server, model and client commands.

Each command group adds itself with a `register(subparsers)` function; add new groups to
`COMMAND_GROUPS`.
"""

from __future__ import annotations

import argparse
import os
import sys


def _model_command(args: argparse.Namespace) -> int:
    from loraplex.server.model.default_model import ensure_default_model

    path = ensure_default_model()
    print(path)
    return 0


def register_model(sub) -> None:
    model = sub.add_parser("model", help="manage the default model cache")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    fetch = model_sub.add_parser("fetch-default", help="install and convert SmolLM2-135M-Instruct once")
    fetch.set_defaults(func=_model_command)


def _serve_command(args: argparse.Namespace) -> int:
    from loraplex.server.config import ConfigError, load_server_config

    values = {key: value for key, value in vars(args).items() if key not in ("func", "command")}
    try:
        config = load_server_config(values, os.environ)
    except ConfigError as error:
        for problem in error.problems:
            print(f"loraplex serve: error: {problem}", file=sys.stderr)
        return 2
    from loraplex.server.app import run

    try:
        return run(config)
    except (OSError, ValueError, RuntimeError, ImportError) as error:
        print(f"loraplex serve: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


def register_serve(sub) -> None:
    from loraplex.server.config import add_arguments

    serve = sub.add_parser(
        "serve", help="run the gRPC inference server",
        description="Run the gRPC server. Every flag can also be set with a LORAPLEX_* env var or a "
                    "--config file; precedence is flag > env > file > default.")
    add_arguments(serve)
    serve.set_defaults(func=_serve_command)


def _fleet_command(args: argparse.Namespace) -> int:
    from loraplex.server.config import ConfigError
    from loraplex.server.fleet.config import load_fleet_config

    values = {key: value for key, value in vars(args).items() if key not in ("func", "command")}
    try:
        config, options = load_fleet_config(values, os.environ)
    except ConfigError as error:
        for problem in error.problems:
            print(f"loraplex fleet: error: {problem}", file=sys.stderr)
        return 2
    try:
        from loraplex.server.fleet.app import run
    except ImportError as error:
        print(f"loraplex fleet: error: {error} (install the fleet extra: pip install 'loraplex[fleet]')",
              file=sys.stderr)
        return 1
    try:
        return run(config, options)
    except (OSError, ValueError, RuntimeError, ImportError) as error:
        print(f"loraplex fleet: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


def register_fleet(sub) -> None:
    from loraplex.server.config import add_arguments
    from loraplex.server.fleet.config import add_fleet_arguments

    fleet = sub.add_parser(
        "fleet", help="run many engines behind one gRPC address on Ray Serve",
        description="Run a Ray Serve application of loraplex replicas on a shared adapter store; Ray's gRPC "
                    "proxy serves the loraplex.v1 services on --port. Takes serve's flags (for each replica) "
                    "plus the fleet flags below; every flag can also be set with a LORAPLEX_* env var.")
    add_arguments(fleet)
    add_fleet_arguments(fleet)
    fleet.set_defaults(func=_fleet_command)


def register_client(sub) -> None:
    from loraplex.client.cli import register

    register(sub)


def register_fidelity(sub) -> None:
    from loraplex.server.fidelity.cli import register

    register(sub)


COMMAND_GROUPS = [register_serve, register_fleet, register_model, register_client, register_fidelity]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description="Multi-adapter LLM inference server.")
    sub = parser.add_subparsers(dest="command", required=True)
    for register in COMMAND_GROUPS:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:             # e.g. `loraplex info | head`: the reader left; not an error
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
