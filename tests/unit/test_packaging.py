"""Packaging invariants: namespaced imports, every package listed, stubs fresh."""

from __future__ import annotations

import filecmp
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAPPING = {"loraplex.server": "server", "loraplex.client": "client",
           "loraplex.adapters_store": "adapters_store", "loraplex": "loraplex"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_directory_is_listed():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = set()
    for prefix, directory in MAPPING.items():
        for init in (ROOT / directory).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / directory)
            found.add(".".join([prefix, *rel.parts]) if rel.parts else prefix)
    assert found - listed == set(), "add these packages to pyproject.toml"


def test_no_bare_top_level_server_or_client_package():
    package_dir = _pyproject()["tool"]["setuptools"]["package-dir"]
    assert all(name.startswith("loraplex") for name in package_dir)
    listed = _pyproject()["tool"]["setuptools"]["packages"]
    assert all(name == "loraplex" or name.startswith("loraplex.") for name in listed)


def test_namespaced_imports_work():
    import loraplex.adapters_store
    import loraplex.client
    import loraplex.server
    assert Path(loraplex.server.__file__).parent == ROOT / "server"


def test_console_script_declared():
    assert _pyproject()["project"]["scripts"]["loraplex"] == "loraplex.cli:main"


def test_checked_in_stubs_match_generated(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_proto
    finally:
        sys.path.pop(0)
    written = gen_proto.generate(tmp_path)
    assert written, "protoc produced nothing"
    for fresh in written:
        checked_in = ROOT / "loraplex" / "v1" / fresh.name
        assert checked_in.exists(), f"{checked_in.name} missing: run `make proto`"
        assert filecmp.cmp(fresh, checked_in, shallow=False), f"{fresh.name} is stale: run `make proto`"
    names = {p.name for p in written}
    extra = {p.name for p in (ROOT / "loraplex" / "v1").glob("*_pb2*.py*")} - names
    assert not extra, f"stubs without a proto file: {extra}"


def test_kernel_source_ships_with_the_package():
    """native.py compiles kernels/csrc at first use, so wheels must carry the sources."""
    from loraplex.server.kernels import native

    data = _pyproject()["tool"]["setuptools"]["package-data"]
    assert {"kernels/csrc/*.cpp", "kernels/csrc/*.h"} <= set(data["loraplex.server"])
    names = {p.name for p in native.SOURCES}
    assert {"bindings.cpp", "attention.cpp", "lora.cpp", "sampling.cpp", "quant_gemm.cpp"} <= names
    assert all(p.is_file() for p in native.SOURCES) and (native.SOURCE_DIR / "common.h").is_file()
