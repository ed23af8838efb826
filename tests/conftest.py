"""Shared fixtures: a tiny random Llama (unit tests) and the default model (integration)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from model_helpers import build_tiny_llama  # noqa: F401 - fixtures below use it


def pytest_addoption(parser):
    parser.addoption("--engine-process", choices=("on", "off"), default=None,
                     help="run the service tests against this EngineClient: on = the engine-core "
                          "process, off = the in-process engine thread (default: the server's default)")


def pytest_configure(config):
    from grpc_harness import ENGINE_PROCESS_ENV

    choice = config.getoption("--engine-process")
    if choice:
        os.environ[ENGINE_PROCESS_ENV] = choice


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (gpu marker); this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def native_kernels():
    """The fused CPU kernels (kernels/csrc), compiled on first use; skipped without a compiler."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the fused CPU kernels cannot be built here")
    from loraplex.server.kernels import native

    return native.load(log=lambda _msg: None)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The converted SmolLM2-135M-Instruct directory (built once by `make model`)."""
    from loraplex.server.model.default_model import ensure_default_model

    return ensure_default_model(log=lambda _msg: None)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, default_model_dir) -> Path:
    """A 2-layer random Llama (hidden 64, GQA 4/2 heads) with the SmolLM2 tokenizer."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), default_model_dir)


@pytest.fixture(scope="session")
def postgres_service():
    """A real PostgreSQL server for the session (pgserver wheel; unix socket, stopped at the end)."""
    from services import PostgresService

    service = PostgresService()
    try:
        yield service
    finally:
        service.close()


@pytest.fixture(scope="session")
def s3_service():
    """A real S3 HTTP endpoint on 127.0.0.1 (moto's threaded server). boto3 in this process and in
    subprocesses is pointed at it through AWS_* variables set for the session."""
    from services import S3Service

    service = S3Service()
    saved = {name: os.environ.get(name) for name in service.env}
    os.environ.update(service.env)
    try:
        yield service
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        service.close()
