"""Client side of the `loraplex` console script: generate, adapters {upload,list,show,rm}, info, health.

`register(subparsers)` adds the commands to loraplex.cli's parser. Exit codes:
0 ok, 1 server error, 2 usage or validation error, 3 not found, 4 authentication or permission,
5 server unavailable, overloaded or too slow (also `health` when not SERVING).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Callable

from . import _format as fmt
from ._exit import EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE, exit_code, explain
from .bench.command import add_parser as add_bench
from .errors import LoraplexError, ValidationError
from .sync_client import Client
from .types import HealthStatus

# ---- parser ------------------------------------------------------------------------------------
def _connection_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection")
    group.add_argument("--address", help="server host:port (env LORAPLEX_ADDRESS; default 127.0.0.1:50051)")
    group.add_argument("--api-key", dest="client_api_key", metavar="KEY", help="API key (env LORAPLEX_API_KEY)")
    group.add_argument("--timeout", type=_positive_seconds, default=300.0,
                       help="deadline per call in seconds (default 300)")
    group.add_argument("--tls", action="store_true", help="connect with TLS (system roots)")
    group.add_argument("--root-certs", metavar="PEM", help="CA certificate file to trust (implies --tls)")
    group.add_argument("--tls-server-name", metavar="NAME", help="name expected in the server certificate")
    return common


def register(sub) -> None:
    """Add generate, adapters, info, health and bench to the `loraplex` subparsers."""
    common = _connection_options()
    _add_generate(sub, common)
    adapters = sub.add_parser("adapters", help="upload, list, show and delete LoRA adapters")
    adapters_sub = adapters.add_subparsers(dest="adapters_command", required=True)
    upload = adapters_sub.add_parser("upload", parents=[common], help="upload a local PEFT LoRA directory")
    upload.add_argument("path", help="directory with adapter_config.json and adapter_model.safetensors")
    upload.add_argument("--id", dest="adapter_id", required=True, help="adapter name on the server")
    upload.add_argument("--private", action="store_true", help="visible only to your tenant")
    upload.add_argument("--allow-base-mismatch", action="store_true", help="skip the base fingerprint check")
    upload.add_argument("--no-progress", action="store_true", help="no progress bar")
    upload.add_argument("--json", action="store_true", help="print the stored adapter as JSON")
    upload.set_defaults(func=_run(_upload))
    reg = adapters_sub.add_parser("register", parents=[common],
                                  help="register an adapter directory the server can read: a path under an "
                                       "--allowed-register-root, or s3://bucket/path/ under an --adapter-source")
    reg.add_argument("adapter_id", metavar="ID")
    reg.add_argument("source", metavar="PATH_OR_S3_URL")
    reg.add_argument("--private", action="store_true", help="visible only to your tenant")
    reg.add_argument("--allow-base-mismatch", action="store_true", help="skip the base fingerprint check")
    reg.add_argument("--json", action="store_true", help="print the stored adapter as JSON")
    reg.set_defaults(func=_run(_register))
    listing = adapters_sub.add_parser("list", parents=[common], help="list adapters (latest versions)")
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    listing.set_defaults(func=_run(_list))
    show = adapters_sub.add_parser("show", parents=[common], help="show one adapter ('name' or 'name@version')")
    show.add_argument("adapter_id", metavar="ID")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=_run(_show))
    remove = adapters_sub.add_parser("rm", parents=[common], help="delete 'name' (all versions) or 'name@version'")
    remove.add_argument("adapter_id", metavar="ID")
    remove.set_defaults(func=_run(_remove))
    info = sub.add_parser("info", parents=[common], help="show the server's model, quantization and limits")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=_run(_info))
    health = sub.add_parser("health", parents=[common], help="print SERVING when the server is ready (exit 5 if not)")
    health.add_argument("--local", action="store_true",
                        help="check the server of this container/host: address and TLS from its own "
                             "LORAPLEX_HOST, LORAPLEX_PORT and LORAPLEX_TLS_CERT (the image's HEALTHCHECK)")
    health.set_defaults(func=_run(_health))
    add_bench(sub, common)


def _finite_float(text: str) -> float:
    """argparse type: a finite number (nan and inf are refused with a usage error)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _positive_seconds(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number of seconds > 0")
    return value


def _add_generate(sub, common: argparse.ArgumentParser) -> None:
    gen = sub.add_parser("generate", parents=[common], help="generate text (optionally with an adapter)")
    gen.add_argument("prompt", help="prompt text, or - to read it from stdin")
    gen.add_argument("--adapter", help="adapter id: 'name' (latest) or 'name@version'")
    gen.add_argument("--max-new-tokens", type=int)
    gen.add_argument("--temperature", type=_finite_float, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=_finite_float)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--repetition-penalty", type=_finite_float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true", default=None)
    shape = gen.add_mutually_exclusive_group()    # structured output: docs/structured-output.md
    shape.add_argument("--json-schema", metavar="SCHEMA", help="output must be JSON valid under this JSON Schema "
                       "(JSON text, or @FILE to read it from a file)")
    shape.add_argument("--json-object", action="store_true", default=None, help="output must be a JSON object")
    shape.add_argument("--regex", help="the whole output must match this regular expression")
    shape.add_argument("--choice", action="append", help="output must be one of these strings (repeatable)")
    shape.add_argument("--grammar", metavar="LARK", help="output must match this Lark grammar (or @FILE)")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user chat message (chat template)")
    gen.add_argument("--system", help="system message (with --chat)")
    gen.add_argument("--tools", metavar="JSON", help="with --chat: a JSON list of tools (OpenAI function tools or "
                     "{name, description, parameters}), or @FILE; calls are printed as JSON lines")
    gen.add_argument("--tool-choice", metavar="CHOICE", help="auto, none, required, or a tool's name")
    gen.add_argument("--chat-template-kwargs", metavar="JSON", help="with --chat: extra chat template variables "
                     "(a JSON object, e.g. '{\"enable_thinking\": false}')")
    gen.add_argument("--stream", action="store_true", help="print text as it is generated")
    gen.add_argument("--json", action="store_true", help="print the result (or each chunk) as JSON")
    gen.set_defaults(func=_run(_generate))


def local_server_address(environ) -> tuple[str, str]:
    """(host:port, TLS certificate path or "") of the server configured by `environ` (LORAPLEX_*),
    reached on loopback when it listens on every interface."""
    host = environ.get("LORAPLEX_HOST", "").strip() or "127.0.0.1"
    if host in ("0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    port = environ.get("LORAPLEX_PORT", "").strip() or "50051"
    return f"{host}:{port}", environ.get("LORAPLEX_TLS_CERT", "").strip()


# ---- commands ----------------------------------------------------------------------------------
def _client(args: argparse.Namespace) -> Client:
    if getattr(args, "local", False):
        address, cert = local_server_address(os.environ)
        return Client(address, args.client_api_key, tls=bool(cert), root_certificates=cert or None,
                      tls_server_name=args.tls_server_name, timeout=args.timeout)
    return Client(args.address, args.client_api_key, tls=args.tls, root_certificates=args.root_certs,
                  tls_server_name=args.tls_server_name, timeout=args.timeout)


def _generate(client: Client, args: argparse.Namespace) -> int:
    if args.system is not None and not args.chat:
        raise ValidationError("--system needs --chat (a plain prompt has no system message)",
                              violations={"--system": "only valid with --chat"})
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
                    stop=args.stop, ignore_eos=args.ignore_eos, json_schema=_text_arg(args.json_schema),
                    json_object=args.json_object, regex=args.regex, choice=args.choice,
                    grammar=_text_arg(args.grammar))
    chat = _chat_args(args)
    if args.chat:
        messages = ([("system", args.system)] if args.system else []) + [("user", prompt)]
        result = (client.chat_stream if args.stream else client.chat)(messages, args.adapter, **chat, **sampling)
    elif any(value is not None for value in chat.values()):
        raise ValidationError("--tools, --tool-choice and --chat-template-kwargs need --chat",
                              violations={"--chat": "missing"})
    else:
        result = (client.generate_stream if args.stream else client.generate)(prompt, args.adapter, **sampling)
    if not args.stream:
        print(fmt.dumps(result) if args.json else result.text)
        for call in [] if args.json else result.tool_calls:
            print(json.dumps({"id": call.id, "name": call.name, "arguments": json.loads(call.arguments)}))
        return EXIT_OK
    for chunk in result:
        print(fmt.dumps(chunk) if args.json else chunk.text, end="\n" if args.json else "", flush=True)
        for call in [] if args.json else chunk.tool_calls:
            print("\n" + json.dumps({"id": call.id, "name": call.name, "arguments": json.loads(call.arguments)}))
    if not args.json:
        print()
    return EXIT_OK


def _chat_args(args: argparse.Namespace) -> dict:
    """--tools / --tool-choice / --chat-template-kwargs as Client.chat keyword arguments."""
    values = {}
    for flag, name in (("--tools", "tools"), ("--chat-template-kwargs", "chat_template_kwargs")):
        text = _text_arg(getattr(args, name))
        try:
            values[name] = None if text is None else json.loads(text)
        except ValueError as error:
            raise ValidationError(f"{flag} is not valid JSON: {error}", violations={flag: "not JSON"}) from None
    return {**values, "tool_choice": args.tool_choice}


def _text_arg(value: str | None) -> str | None:
    """A flag's text, or the content of the file named after '@'."""
    if value is None or not value.startswith("@"):
        return value
    try:
        with open(value[1:], encoding="utf-8") as handle:
            return handle.read()
    except OSError as error:
        raise ValidationError(f"cannot read {value[1:]}: {error.strerror}") from None


def _upload(client: Client, args: argparse.Namespace) -> int:
    show_bar = not args.no_progress and not args.json and sys.stderr.isatty()
    adapter = client.upload_adapter(args.path, args.adapter_id, private=args.private,
                                    allow_base_mismatch=args.allow_base_mismatch, show_progress=show_bar)
    print(fmt.dumps(adapter) if args.json else
          f"uploaded {adapter.ref} (rank {adapter.rank}, {fmt.human_bytes(adapter.size_bytes)}, "
          f"sha256 {adapter.sha256[:12]})")
    return EXIT_OK


def _register(client: Client, args: argparse.Namespace) -> int:
    adapter = client.register_adapter(args.adapter_id, args.source, private=args.private,
                                      allow_base_mismatch=args.allow_base_mismatch)
    print(fmt.dumps(adapter) if args.json else
          f"registered {adapter.ref} (rank {adapter.rank}, {fmt.human_bytes(adapter.size_bytes)}, "
          f"sha256 {adapter.sha256[:12]})")
    return EXIT_OK


def _list(client: Client, args: argparse.Namespace) -> int:
    adapters = client.list_adapters()
    print(fmt.dumps(adapters) if args.json else fmt.adapters_table(adapters))
    return EXIT_OK


def _show(client: Client, args: argparse.Namespace) -> int:
    adapter = client.get_adapter(args.adapter_id)
    print(fmt.dumps(adapter) if args.json else fmt.adapter_details(adapter))
    return EXIT_OK


def _remove(client: Client, args: argparse.Namespace) -> int:
    versions = client.delete_adapter(args.adapter_id)
    name = args.adapter_id.split("@", 1)[0]
    print(f"deleted {name} version{'s' if len(versions) != 1 else ''} {', '.join(map(str, versions))}")
    return EXIT_OK


def _info(client: Client, args: argparse.Namespace) -> int:
    info = client.info()
    print(fmt.dumps(info) if args.json else fmt.server_details(info))
    return EXIT_OK


def _health(client: Client, args: argparse.Namespace) -> int:
    status = client.health()
    print(status.value)
    return EXIT_OK if status is HealthStatus.SERVING else EXIT_UNAVAILABLE


# ---- errors ------------------------------------------------------------------------------------
def _run(command: Callable[[Client, argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap a command: open the client, map SDK errors to a message and an exit code."""
    def run(args: argparse.Namespace) -> int:
        try:
            client = _client(args)
        except (OSError, ValueError) as error:
            print(f"loraplex: error: {error}", file=sys.stderr)
            return EXIT_USAGE
        try:
            with client:
                return command(client, args)
        except LoraplexError as error:
            print(f"loraplex: error: {explain(error, client.address)}", file=sys.stderr)
            return exit_code(error)
        except KeyboardInterrupt:
            return 130
    return run
