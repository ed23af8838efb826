"""Tag a LoftQ-initialised adapter with the fingerprint of the base it must be served on."""

from __future__ import annotations

import json
from pathlib import Path

from ...adapters_store.peft_config import FINGERPRINT_KEY
from ..lora.fingerprint import base_spec_from_model_config
from ..model.config import ModelConfig


def served_fingerprint(model_dir: str | Path, quantize: str) -> str:
    """The base fingerprint `loraplex serve --model model_dir --quantize quantize` reports."""
    return base_spec_from_model_config(ModelConfig.from_dir(model_dir), quantize).fingerprint


def pin_adapter_to_base(adapter_dir: str | Path, model_dir: str | Path, quantize: str) -> str:
    """Write `loraplex_base_fingerprint` into adapter_config.json; returns the fingerprint.

    LoftQ chooses A/B so that quant(W) + B @ A approximates W for one quantized backbone; the
    store then refuses the adapter on any other base (different model or backend).
    """
    config_path = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config[FINGERPRINT_KEY] = served_fingerprint(model_dir, quantize)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return config[FINGERPRINT_KEY]
