"""The `loraplex bench` subcommand: parse options, check the server, run each load level, report."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import platform
import sys

from .._exit import EXIT_SERVER, EXIT_USAGE, exit_code, explain
from ..async_client import AsyncClient
from ..errors import LoraplexError
from .config import BenchConfig, add_arguments, configs_from_args
from .report import plot_sweep, run_record, text_table, write_json
from .runner import run_benchmark
from .stats import BenchStats, compute_stats


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    """Register `bench` on the `loraplex` subparsers (`common` holds the connection options)."""
    parser = sub.add_parser("bench", parents=[common], help="load-test a server (throughput, TTFT, TPOT, ITL)",
                            description="Send a workload over gRPC (or the OpenAI-compatible HTTP API with "
                                        "--api openai) and report throughput and latency, like `vllm bench serve`.")
    add_arguments(parser)
    parser.set_defaults(func=run_command, timeout=600.0)


def _client(args: argparse.Namespace):
    """AsyncClient over gRPC, or the OpenAI-compatible HTTP driver with --api openai."""
    if args.api == "openai":
        from .openai_client import OpenAIBenchClient

        base_url = args.base_url or "http://127.0.0.1:8000/v1"
        return OpenAIBenchClient(base_url, args.client_api_key, timeout=args.timeout,
                                 verify=args.root_certs or True)
    return AsyncClient(args.address, args.client_api_key, tls=args.tls, root_certificates=args.root_certs,
                       tls_server_name=args.tls_server_name, timeout=args.timeout)


async def _run_all(args: argparse.Namespace, configs: list[BenchConfig]) -> list[tuple[BenchConfig, BenchStats]]:
    async with _client(args) as client:
        await client.health()
        results = []
        for config in configs:
            result = await run_benchmark(client, config)
            stats = compute_stats(result.records, result.duration_s, config.slo_ttft_ms, config.slo_tpot_ms)
            print(text_table(config, stats), flush=True)
            results.append((config, stats))
        return results


def run_command(args: argparse.Namespace) -> int:
    """Exit 0 when every request succeeded, 1 when some failed, 2 on bad options, 5 if unreachable."""
    try:
        configs = configs_from_args(args)
    except ValueError as error:
        print(f"loraplex bench: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        results = asyncio.run(_run_all(args, configs))
    except LoraplexError as error:
        print(f"loraplex bench: error: {explain(error, args.address or '127.0.0.1:50051')}", file=sys.stderr)
        return exit_code(error)
    except (OSError, ValueError) as error:
        print(f"loraplex bench: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    if args.json_path:
        meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "api": args.api, "address": args.base_url if args.api == "openai" else args.address, "python": platform.python_version()}
        write_json(args.json_path, [run_record(c, s) for c, s in results], meta)
    if args.plot_dir:
        try:
            path = plot_sweep([c for c, _ in results], [s for _, s in results], args.plot_dir)
            print(f"plot: {path}")
        except ImportError:
            print("loraplex bench: error: --plot-dir needs matplotlib (pip install matplotlib)", file=sys.stderr)
            return EXIT_USAGE
    return EXIT_SERVER if any(s.failed for _, s in results) else 0
