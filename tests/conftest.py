"""Shared fixtures: a tiny random Llama (unit tests) and the default model (integration)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch


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


def build_tiny_llama(out_dir: Path, tokenizer_src: Path, **overrides) -> Path:
    """Save a random tiny Llama (float32 safetensors) plus the default model's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    params = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
        pad_token_id=2,
    )
    params.update(overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**params)).eval()
    model.save_pretrained(out_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "special_tokens_map.json"):
        if (tokenizer_src / name).exists():
            shutil.copy(tokenizer_src / name, out_dir / name)
    return out_dir


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
