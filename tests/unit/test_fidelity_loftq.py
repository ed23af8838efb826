"""A LoftQ-initialised adapter pinned to its nf4 backbone is served there and refused elsewhere."""

from __future__ import annotations

import pytest
import torch

from loraplex.adapters_store.config import StoreConfig
from loraplex.adapters_store.errors import AdapterValidationError
from loraplex.adapters_store.store import AdapterStore
from loraplex.server.fidelity.loftq import pin_adapter_to_base, served_fingerprint
from loraplex.server.lora.fingerprint import base_spec_from_model_config
from loraplex.server.model.config import ModelConfig


@pytest.fixture(scope="module")
def loftq_adapter(tiny_llama_dir, tmp_path_factory):
    from peft import LoftQConfig, LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                        init_lora_weights=False)
    try:    # PEFT's LoftQ init needs scipy; the refusal rule only reads adapter_config.json
        import scipy  # noqa: F401
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                            init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=1))
    except ImportError:
        pass
    out = tmp_path_factory.mktemp("loftq") / "loftq-ad"
    get_peft_model(base, config).save_pretrained(out)
    pin_adapter_to_base(out, tiny_llama_dir, "bnb-nf4")
    return out


def _store(tmp_path, model_dir, quantize, root):
    base = base_spec_from_model_config(ModelConfig.from_dir(model_dir), quantize)
    return AdapterStore(tmp_path / f"store-{quantize}", StoreConfig(allowed_register_roots=(root,)), base)


def test_loftq_adapter_registers_on_its_backbone(tmp_path, tiny_llama_dir, loftq_adapter):
    store = _store(tmp_path, tiny_llama_dir, "bnb-nf4", loftq_adapter.parent)
    try:
        record = store.register_path("loftq", loftq_adapter)
        assert record.key == "loftq@1"
        assert store.load(record.key).config.base_fingerprint == served_fingerprint(tiny_llama_dir, "bnb-nf4")
    finally:
        store.close()


@pytest.mark.parametrize("other", ["none", "hqq-4bit"])
def test_loftq_adapter_is_refused_on_another_base_with_the_reason(tmp_path, tiny_llama_dir, loftq_adapter, other):
    store = _store(tmp_path, tiny_llama_dir, other, loftq_adapter.parent)
    try:
        with pytest.raises(AdapterValidationError) as caught:
            store.register_path("loftq", loftq_adapter)
        assert caught.value.rule == "base_fingerprint"
        message = str(caught.value)
        assert "LoftQ" in message and served_fingerprint(tiny_llama_dir, other) in message
        assert store.list(None) == []
    finally:
        store.close()
