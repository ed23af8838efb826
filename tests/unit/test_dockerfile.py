"""The Dockerfile cannot be built here (no Docker engine): check its invariants by parsing it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _values(name: str) -> list[str]:
    return [rest for word, rest in _instructions() if word == name]


def test_cuda_base_with_python_310_for_eetq():
    assert re.match(r"nvidia/cuda:[\w.\-]+-runtime", _values("FROM")[0])
    assert any("python3.10" in run for run in _values("RUN"))
    assert any('.[eetq]' in run for run in _values("RUN"))


def test_torch_installed_before_the_package_like_the_makefile():
    runs = _values("RUN")
    torch_at = next(i for i, r in enumerate(runs) if 'torch==' in r)
    pkg_at = next(i for i, r in enumerate(runs) if 'pip install ".' in r)
    assert torch_at < pkg_at
    makefile = (ROOT / "Makefile").read_text()
    version = re.search(r"TORCH_VERSION \?= (\S+)", makefile).group(1)
    assert f"torch=={version}" in runs[torch_at]


def test_runs_as_non_root_with_volumes_and_ports():
    assert _values("USER") and _values("USER")[-1] not in ("root", "0")
    volumes = " ".join(_values("VOLUME"))
    assert "/var/lib/loraplex/cache" in volumes and "/var/lib/loraplex/store" in volumes
    ports = " ".join(_values("EXPOSE")).split()
    assert "50051" in ports and "9090" in ports and "8000" in ports     # gRPC, metrics, OpenAI HTTP


def test_healthcheck_uses_grpc_health_and_entrypoint_serves():
    assert "loraplex" in _values("HEALTHCHECK")[0] and "health" in _values("HEALTHCHECK")[0]
    assert "serve" in _values("ENTRYPOINT")[0]


def test_configuration_through_loraplex_env_vars():
    env = " ".join(_values("ENV"))
    for name in ("LORAPLEX_HOST", "LORAPLEX_PORT", "LORAPLEX_METRICS_PORT", "LORAPLEX_STORE",
                 "LORAPLEX_MODEL"):
        assert name in env
    copies = " ".join(_values("COPY"))
    for directory in ("server", "client", "adapters_store", "proto", "loraplex"):
        assert directory in copies
