"""`pip install .` with no extras: a fresh venv gets the SDK and client CLI, and no torch.

The wheel is built from a copy of the sources with this venv's setuptools; the fresh venv
installs it with its core dependencies (grpcio, protobuf, ...) through the ordinary pip
configuration, then talks to a real server on loopback.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from grpc_harness import LoopThread, start_full_server

from loraplex.server.app import drain_and_stop
from loraplex.server.config import load_server_config

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "loraplex", "server", "client", "adapters_store", "proto")

# ~30 s of CPU plus pip downloads: `make test-client-install` (slow, not in `make test`).
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _run(args, **kw) -> subprocess.CompletedProcess:
    # cwd outside the checkout: its loraplex/ directory would shadow the installed package
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600,
                          cwd=kw.pop("cwd", Path(args[0]).parent), **kw)


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("client-install")
    src = work / "src"
    src.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                         if (ROOT / name).is_dir() else {}))
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                  "-w", work / "wheels", src])
    assert built.returncode == 0, built.stderr[-3000:]
    venv = work / "venv"
    assert _run([sys.executable, "-m", "venv", venv]).returncode == 0
    wheel = next((work / "wheels").glob("loraplex-*.whl"))
    installed = _run([venv / "bin" / "python", "-m", "pip", "install", "-q", wheel])
    assert installed.returncode == 0, installed.stderr[-3000:]
    return venv


@pytest.fixture(scope="module")
def address(tiny_llama_dir, tmp_path_factory):
    loop = LoopThread()
    values = {"model": str(tiny_llama_dir), "port": "0", "metrics_port": "0",
              "store": str(tmp_path_factory.mktemp("store")), "kv_cache_memory": "16MiB",
              "max_total_tokens": "1024", "max_input_tokens": "512", "max_new_tokens": "100",
              "max_loras": "2"}
    running = loop.run(start_full_server(load_server_config(values, {})))
    try:
        yield f"127.0.0.1:{running.port}"
    finally:
        loop.run(drain_and_stop(running, 1.0, log=lambda _m: None))
        loop.close()


def test_fresh_client_install_has_no_torch(client_venv):
    probe = ("import importlib.util as u; print([m for m in ('torch', 'transformers', 'bitsandbytes', "
             "'hqq', 'numpy') if u.find_spec(m)])")
    result = _run([client_venv / "bin" / "python", "-c", probe])
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def test_client_cli_and_sdk_against_a_real_server(client_venv, address):
    started = time.monotonic()
    health = _run([client_venv / "bin" / "loraplex", "health", "--address", address])
    health_s = time.monotonic() - started
    assert health.returncode == 0 and "SERVING" in health.stdout, health.stdout + health.stderr
    print(f"loraplex health (client-only venv) took {health_s:.2f}s")
    generated = _run([client_venv / "bin" / "loraplex", "generate", "Hello", "--max-new-tokens", "3",
                      "--json", "--address", address])
    assert generated.returncode == 0 and '"finish_reason"' in generated.stdout, generated.stderr[-2000:]
    sdk = ("import sys\nfrom loraplex.client import Client\n"
           f"with Client({address!r}) as c:\n"
           "    assert c.health() == 'SERVING'\n"
           "    g = c.generate('Hello', max_new_tokens=3)\n"
           "    assert g.usage.generated_tokens == 3, g\n"
           "    assert c.list_adapters() == []\n"
           "assert 'torch' not in sys.modules\nprint('SDK ok')")
    result = _run([client_venv / "bin" / "python", "-c", sdk])
    assert result.returncode == 0 and "SDK ok" in result.stdout, result.stdout + result.stderr[-3000:]


def test_serve_in_a_client_install_names_the_server_extra(client_venv):
    result = _run([client_venv / "bin" / "loraplex", "serve", "--model", "default"])
    assert result.returncode == 2
    assert 'pip install "loraplex[server]"' in result.stderr
