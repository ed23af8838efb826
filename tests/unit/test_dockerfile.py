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


# CUDA major version of the default PyPI Linux wheel of each torch release the Makefile pins
# (from the wheel's metadata: torch 2.13.0 requires cuda-toolkit==13.0.3, nvidia-cudnn-cu13).
# A new TORCH_VERSION fails here until its CUDA major is looked up and the base image matches.
TORCH_WHEEL_CUDA_MAJOR = {"2.13.0": 13}


def _makefile_torch() -> str:
    return re.search(r"TORCH_VERSION \?= (\S+)", (ROOT / "Makefile").read_text()).group(1)


def _args() -> dict[str, str]:
    return dict(arg.split("=", 1) for arg in _values("ARG") if "=" in arg)


def test_cuda_base_matches_the_torch_wheel_cuda_major():
    match = re.match(r"nvidia/cuda:(\d+)\.\d+(?:\.\d+)?-(?:cudnn-)?(?:base|runtime)-ubuntu(\d+\.\d+)",
                     _values("FROM")[0])
    assert match, _values("FROM")[0]
    version = _makefile_torch()
    assert _args()["TORCH_VERSION"] == version
    assert version in TORCH_WHEEL_CUDA_MAJOR, f"look up the CUDA major of the torch {version} wheel"
    assert int(match.group(1)) == TORCH_WHEEL_CUDA_MAJOR[version]
    assert match.group(2) == "24.04"          # CPython 3.12


def test_compiler_and_python_headers_for_triton():
    apt = " ".join(r for r in _values("RUN") if "apt-get install" in r).split()
    assert "gcc" in apt and "python3-dev" in apt and "python3-venv" in apt
    env = " ".join(_values("ENV"))
    assert "TRITON_CACHE_DIR=/var/lib/loraplex/cache/" in env    # compiled kernels survive restarts


def test_current_python_and_eetq_only_as_an_opt_in():
    runs = " ".join(_values("RUN"))
    assert "python3.10" not in runs and "python3 -m venv" in runs
    assert "eetq" not in _args()["EXTRAS"]
    assert '".[${EXTRAS}]"' in runs
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert all("python_version == '3.10'" in req for req in extras["eetq"])


def test_torch_installed_before_the_package_like_the_makefile():
    runs = _values("RUN")
    torch_at = next(i for i, r in enumerate(runs) if 'torch==' in r)
    pkg_at = next(i for i, r in enumerate(runs) if 'pip install' in r and '".[' in r)
    assert torch_at < pkg_at
    assert 'torch==${TORCH_VERSION}' in runs[torch_at] and 'torch==${TORCH_VERSION}' in runs[pkg_at]


def test_device_is_cuda_and_fails_loudly_without_it():
    assert "LORAPLEX_DEVICE=cuda" in " ".join(_values("ENV"))
    import pytest
    import torch

    from loraplex.server.engine.builder import DeviceUnavailable, resolve_device

    if torch.cuda.is_available():
        pytest.skip("CUDA is usable here")
    with pytest.raises(DeviceUnavailable, match="--device cuda.*--device cpu"):
        resolve_device("cuda")
    with pytest.raises(DeviceUnavailable):
        resolve_device("cuda:1")
    assert resolve_device("auto") == "cpu"


def test_stop_signal_and_grace_period_match_the_docs():
    assert _values("STOPSIGNAL") == ["SIGTERM"]
    env = " ".join(_values("ENV"))
    grace = int(re.search(r"LORAPLEX_GRACE_PERIOD=(\d+)", env).group(1))
    label = int(re.search(r'org\.loraplex\.stop-timeout="(\d+)"', " ".join(_values("LABEL"))).group(1))
    assert label > grace, "the container runtime must wait longer than the server's grace period"
    docs = (ROOT / "docs" / "server.md").read_text()
    assert f"--stop-timeout {label}" in docs and f"stop_grace_period: {label}s" in docs


def test_dockerignore_keeps_the_context_small_and_the_sources_in():
    ignored = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")]
    for name in (".git", ".venv", "tests"):
        assert name in ignored
    copied = [c.split()[-2] for c in _values("COPY")]
    for source in copied:
        assert source.rstrip("/") not in ignored and f"{source}/" not in ignored


def test_runs_as_non_root_with_volumes_and_ports():
    assert _values("USER") and _values("USER")[-1] not in ("root", "0")
    volumes = " ".join(_values("VOLUME"))
    assert "/var/lib/loraplex/cache" in volumes and "/var/lib/loraplex/store" in volumes
    ports = " ".join(_values("EXPOSE")).split()
    assert "50051" in ports and "9090" in ports and "8000" in ports     # gRPC, metrics, OpenAI HTTP


def test_healthcheck_uses_grpc_health_and_entrypoint_serves():
    check = _values("HEALTHCHECK")[0]
    assert 'CMD ["loraplex", "health"' in check     # the client CLI: no torch import per probe
    assert "serve" in _values("ENTRYPOINT")[0]


def test_configuration_through_loraplex_env_vars():
    env = " ".join(_values("ENV"))
    for name in ("LORAPLEX_HOST", "LORAPLEX_PORT", "LORAPLEX_METRICS_PORT", "LORAPLEX_STORE",
                 "LORAPLEX_MODEL"):
        assert name in env
    copies = " ".join(_values("COPY"))
    for directory in ("server", "client", "adapters_store", "proto", "loraplex"):
        assert directory in copies
