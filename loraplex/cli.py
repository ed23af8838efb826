"""The `loraplex` console script: dispatches to server, model and client commands.

Each command group adds itself with a `register(subparsers)` function; add new groups to
`COMMAND_GROUPS`, as `CommandGroup(register, (command words...), needs_server)` so that a
command registers (and imports) only its own group: `loraplex health` then never imports
torch, and works from `pip install loraplex` (no server extra). A plain function in the list
is registered for every command. A server group whose imports fail (no `loraplex[server]`)
is replaced by commands that say how to install it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Callable

SERVER_INSTALL_HINT = 'pip install "loraplex[server]"'


def server_extra_missing(command: str) -> str | None:
    """A message naming the install command when the server's dependencies are absent."""
    missing = [name for name in ("torch", "transformers", "safetensors")
               if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (f"loraplex {command}: this install has the client only ({', '.join(missing)} missing); "
            f"the server needs {SERVER_INSTALL_HINT}")


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

    missing = server_extra_missing("serve")
    if missing:
        print(missing, file=sys.stderr)
        return 2

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


def _demo_command(args: argparse.Namespace) -> int:
    from loraplex.server.demo.walkthrough import DemoOptions, run_demo

    options = DemoOptions(address=args.address, api_key=args.api_key, start_server=not args.no_start,
                          adapter_dir=args.adapter_dir, steps=args.steps)
    try:
        run_demo(options, log=lambda line: print(line, flush=True))
    except (OSError, ValueError, RuntimeError, ImportError) as error:
        print(f"loraplex demo: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


def register_demo(sub) -> None:
    from pathlib import Path

    demo = sub.add_parser(
        "demo", help="train a small adapter for the default model, upload it, and compare replies",
        description="A first adapter end to end: trains the demo LoRA (replies start with 'ANSWER:') once, "
                    "uploads it to the server at --address (or starts one on free ports when none answers), "
                    "and prints each question's reply without and with the adapter.")
    demo.add_argument("--address", default=os.environ.get("LORAPLEX_ADDRESS", "127.0.0.1:50051"),
                      help="server to use (env LORAPLEX_ADDRESS)")
    demo.add_argument("--api-key", default=os.environ.get("LORAPLEX_API_KEY"),
                      help="admin key when the server has keys (env LORAPLEX_API_KEY)")
    demo.add_argument("--no-start", action="store_true", help="fail instead of starting a server")
    demo.add_argument("--adapter-dir", type=Path, default=None,
                      help="where the adapter is kept (default $LORAPLEX_CACHE/demo/answer-format)")
    demo.add_argument("--steps", type=int, default=30, help="training steps when the adapter is missing")
    demo.set_defaults(func=_demo_command)


def register_client(sub) -> None:
    from loraplex.client.cli import register

    register(sub)


def register_fidelity(sub) -> None:
    from loraplex.server.fidelity.cli import register

    register(sub)


def register_store(sub) -> None:
    from loraplex.server.store_cli import register

    register(sub)


@dataclass(frozen=True)
class CommandGroup:
    """A `register(subparsers)` function, the top-level words it adds, and whether it is server-side."""

    register: Callable
    commands: tuple[str, ...]
    needs_server: bool = True


CLIENT_COMMANDS = ("generate", "adapters", "info", "health", "bench")
COMMAND_GROUPS: list = [
    CommandGroup(register_serve, ("serve",)),
    CommandGroup(register_fleet, ("fleet",)),
    CommandGroup(register_model, ("model",)),
    CommandGroup(register_client, CLIENT_COMMANDS, needs_server=False),
    CommandGroup(register_fidelity, ("eval", "merge")),
    CommandGroup(register_store, ("store",)),
    CommandGroup(register_demo, ("demo",)),
]


def _command_word(argv: list[str]) -> str | None:
    return next((arg for arg in argv if not arg.startswith("-")), None)


def _register_missing(sub, group: CommandGroup) -> None:
    """Stand-ins for a server group that cannot be imported here: they print the install hint."""
    for word in group.commands:
        stub = sub.add_parser(word, help=f"(needs {SERVER_INSTALL_HINT})", add_help=False)
        stub.add_argument("rest", nargs=argparse.REMAINDER)
        stub.set_defaults(func=lambda _args, word=word: _print_missing(word))


def _print_missing(word: str) -> int:
    print(server_extra_missing(word) or f"loraplex {word}: needs {SERVER_INSTALL_HINT}", file=sys.stderr)
    return 2


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser with the groups `argv`'s command needs (all of them for --help or no command)."""
    parser = argparse.ArgumentParser(prog="loraplex", description="Multi-adapter LLM inference server.")
    sub = parser.add_subparsers(dest="command", required=True)
    word = _command_word(argv) if argv is not None else None
    known = {w for g in COMMAND_GROUPS if isinstance(g, CommandGroup) for w in g.commands}
    for group in COMMAND_GROUPS:
        if not isinstance(group, CommandGroup):
            group(sub)
        elif word in known and word not in group.commands:
            continue
        elif not group.needs_server:
            group.register(sub)
        else:
            try:
                group.register(sub)
            except ImportError:
                _register_missing(sub, group)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:             # e.g. `loraplex info | head`: the reader left; not an error
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
