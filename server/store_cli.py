"""`loraplex store gc`: store-wide garbage collection of unreferenced adapter blobs (operators only).

It opens the registry and blob backends directly (the same --store / --store-registry /
--store-blobs settings and LORAPLEX_* env vars as `loraplex serve`), so it needs the store's
credentials: that is what makes it an admin operation. Safe while servers use the store.
"""

from __future__ import annotations

import argparse
import os
import sys

_SETTINGS = (("store", "--store", "LORAPLEX_STORE", "adapter store directory (local staging and caches)"),
             ("store_registry", "--store-registry", "LORAPLEX_STORE_REGISTRY", "postgresql://... registry"),
             ("store_blobs", "--store-blobs", "LORAPLEX_STORE_BLOBS", "s3://bucket/prefix blob store"))


def register(sub) -> None:
    store = sub.add_parser("store", help="operate on the adapter store (admin)")
    store_sub = store.add_subparsers(dest="store_command", required=True)
    gc = store_sub.add_parser("gc", help="delete blobs no adapter version refers to (store-wide, safe while serving)")
    for dest, flag, env, text in _SETTINGS:
        gc.add_argument(flag, dest=dest, default=None, help=f"{text} (env {env})")
    gc.add_argument("--stale-delete-after", type=float, default=None, metavar="SECONDS",
                    help="finish deletions interrupted longer ago than this (default 600 for PostgreSQL, "
                         "0 for the SQLite registry)")
    gc.set_defaults(func=_gc)


def _gc(args: argparse.Namespace) -> int:
    from ..adapters_store.backends import check_urls, open_backends
    from ..adapters_store.config import StoreConfig
    from ..adapters_store.errors import StoreError
    from ..adapters_store.recovery import collect_garbage
    from .model.default_model import cache_root

    values = {dest: getattr(args, dest) or os.environ.get(env, "") for dest, _, env, _ in _SETTINGS}
    problems = check_urls(values["store_registry"], values["store_blobs"])
    if problems:
        for problem in problems:
            print(f"loraplex store gc: error: {problem}", file=sys.stderr)
        return 2
    root = os.path.expanduser(values["store"]) if values["store"] else cache_root() / "store"
    try:
        backends = open_backends(root, StoreConfig(registry_url=values["store_registry"],
                                                   blobs_url=values["store_blobs"]))
    except StoreError as error:
        print(f"loraplex store gc: error: {error}", file=sys.stderr)
        return 1
    try:
        stale = args.stale_delete_after
        if stale is None:
            stale = 600.0 if backends.registry.shared else 0.0
        report = collect_garbage(backends.registry, backends.blobs, stale)
    except StoreError as error:
        print(f"loraplex store gc: error: {error}", file=sys.stderr)
        return 1
    finally:
        backends.close()
    print(f"loraplex store gc: {report.summary()} ({backends.registry.url}, {backends.blobs.url})")
    for item in report.deletions_finished + report.blobs_removed:
        print(f"  removed {item}")
    return 0
