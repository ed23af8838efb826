"""The `loraplex` console script: dispatches to server, model and client commands."""

from __future__ import annotations

import argparse
import sys


def _model_command(args: argparse.Namespace) -> int:
    from loraplex.server.model.default_model import ensure_default_model

    path = ensure_default_model()
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description="Multi-adapter LLM inference server.")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="manage the default model cache")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    fetch = model_sub.add_parser("fetch-default", help="install and convert SmolLM2-135M-Instruct once")
    fetch.set_defaults(func=_model_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
