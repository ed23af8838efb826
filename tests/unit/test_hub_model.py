"""`--model org/name` through the real huggingface_hub code path, offline, against a cache laid out
as the Hub lays it out (models--org--name/{blobs, snapshots/<commit>, refs/main}). No network."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from loraplex.server.config import ConfigError, load_server_config
from loraplex.server.model.config import ModelConfig
from loraplex.server.model.default_model import resolve_model_path
from loraplex.server.model.hub import HubModel, HubModelError, ensure_hub_model, is_hub_id

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OFFLINE = {"HF_HUB_OFFLINE": "1"}


def lay_out_hub_cache(cache: Path, repo_id: str, source: Path, commit: str = COMMIT,
                      ref: str = "main") -> Path:
    """Copy `source`'s files into a Hub cache: content-addressed blobs, snapshot symlinks, a ref."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in sorted(source.iterdir()):
        if not file.is_file():
            continue
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture()
def hub_cache(tmp_path, tiny_llama_dir) -> Path:
    cache = tmp_path / "hub"
    lay_out_hub_cache(cache, "tiny-org/tiny-llama", tiny_llama_dir)
    return cache


def test_cached_model_resolves_offline_to_its_snapshot(hub_cache, monkeypatch):
    logs = []
    path = ensure_hub_model(HubModel("tiny-org/tiny-llama"), logs.append, cache_dir=hub_cache, environ=OFFLINE)
    assert path == hub_cache / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT
    assert ModelConfig.from_dir(path).architecture == "LlamaForCausalLM"
    assert not logs                                            # offline: nothing fetched, nothing said
    by_commit = ensure_hub_model(HubModel("tiny-org/tiny-llama", COMMIT), cache_dir=hub_cache, environ=OFFLINE)
    assert by_commit == path
    # Through the server's resolver with the Hub's own environment variables.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))   # read at import by the library
    assert resolve_model_path("tiny-org/tiny-llama", log=logs.append) == path


def test_offline_and_not_cached_says_what_to_do(hub_cache):
    with pytest.raises(HubModelError, match="not in the Hugging Face cache and HF_HUB_OFFLINE is set"):
        ensure_hub_model(HubModel("tiny-org/absent"), cache_dir=hub_cache, environ=OFFLINE)
    with pytest.raises(HubModelError, match="HF_HUB_OFFLINE"):
        ensure_hub_model(HubModel("tiny-org/tiny-llama", "v2"), cache_dir=hub_cache, environ=OFFLINE)


def test_a_pickle_only_snapshot_is_refused(tmp_path, tiny_llama_dir):
    source = tmp_path / "pickled"
    shutil.copytree(tiny_llama_dir, source)
    (source / "model.safetensors").rename(source / "pytorch_model.bin")
    cache = tmp_path / "hub"
    lay_out_hub_cache(cache, "tiny-org/pickled", source)
    with pytest.raises(HubModelError, match="no safetensors weights.*never loads pickle"):
        ensure_hub_model(HubModel("tiny-org/pickled"), cache_dir=cache, environ=OFFLINE)


def test_hub_ids_and_local_directories_are_told_apart(tmp_path, monkeypatch):
    assert is_hub_id("Qwen/Qwen3-0.6B") and is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not is_hub_id("default") and not is_hub_id("/abs/path") and not is_hub_id("a/b/c")
    assert not is_hub_id("../x") and not is_hub_id("org/..")
    local = tmp_path / "org" / "name"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not is_hub_id("org/name")                           # an existing local path wins


def test_serve_flags_accept_a_hub_id_and_revision():
    config = load_server_config({"model": "Qwen/Qwen3-0.6B"}, {"LORAPLEX_REVISION": "v1.0"})
    assert (config.model, config.revision, config.base_model_name) == ("Qwen/Qwen3-0.6B", "v1.0",
                                                                       "Qwen/Qwen3-0.6B")
    with pytest.raises(ConfigError, match="--model 'not a model'"):
        load_server_config({"model": "not a model"}, {})
    with pytest.raises(ConfigError, match="--revision"):
        load_server_config({"model": "default", "revision": "v1"}, {})

