"""Gemma 2, Gemma 3 and Phi-3 with mixed adapters in one packed batch against PEFT (float32).

Phi-3's adapters target its fused modules (`qkv_proj`, `gate_up_proj`): each is served as one
LoRA sub-module over the whole fused output, as PEFT trains and computes it (one A, one B), so
the per-part delta machinery applies with a single part."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peft_oracle import registered_store, save_random_adapters
from quant_oracle import load_reference_model
from test_lora_model import ADAPTERS, ROWS, check_mixed_batch, load_peft_dir, peft_logits, run_ours
from test_model_families import save_family
from loraplex.adapters_store.errors import AdapterValidationError
from loraplex.server.layers.base import QuantSpec

PHI3_ADAPTERS = {  # the names check_mixed_batch's rows use; fused and plain targets mixed
    "alpha": dict(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    "beta": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["qkv_proj", "down_proj"]),
    "gamma": dict(r=2, lora_alpha=16, target_modules=["gate_up_proj", "o_proj"]),
}


@pytest.fixture(scope="module")
def phi3(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("lora-phi3")
    model_dir = save_family(root / "model", "phi3", vocab_size=256, sliding_window=6)
    return model_dir, save_random_adapters(model_dir, root / "adapters", PHI3_ADAPTERS, first_seed=10)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_mixed_adapter_batch_matches_peft(family, tmp_path):
    model_dir = save_family(tmp_path / "model", family, vocab_size=256)
    adapters = save_random_adapters(model_dir, tmp_path / "adapters", ADAPTERS, first_seed=10)
    check_mixed_batch(model_dir, adapters, "torch")


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_phi3_fused_module_adapters_match_peft(phi3, backend):
    check_mixed_batch(*phi3, backend)


def test_phi3_fused_module_adapters_on_a_quantized_base_match_peft(phi3):
    """hqq-4bit base (the fused qkv_proj / gate_up_proj quantized as stored) with mixed adapters,
    against PEFT over transformers holding the same HQQ weights (tests/quant_oracle.py)."""
    model_dir, adapter_dirs = phi3
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (6, 9, 5, 7)]
    extra = torch.randint(3, 256, (4,), generator=gen).tolist()
    ours = run_ours(model_dir, adapter_dirs, prompts, extra, "torch", spec=QuantSpec(method="hqq-4bit"))
    expected = peft_logits(model_dir, adapter_dirs, [p + [t] for p, t in zip(prompts, extra)], ROWS,
                           base=load_reference_model(model_dir, "hqq-4bit"))
    for i, (got, want) in enumerate(zip(ours, expected)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m, i=i: f"row {i} ({ROWS[i]}): {m}")


def test_phi3_adapters_pass_the_store_and_load_as_peft_saved_them(phi3, tmp_path):
    """Upload validation knows Phi-3's modules (qkv_proj, gate_up_proj, with fused shapes); the
    stored adapter loads with the same (A, B) per fused module; q_proj is not a Phi-3 module."""
    model_dir, adapter_dirs = phi3
    store = registered_store(model_dir, "none", adapter_dirs, tmp_path / "store")
    try:
        for name, path in adapter_dirs.items():
            loaded = store.load(store.resolve(name, None).key)
            expected = load_peft_dir(name, path).weights
            assert set(loaded.weights) == set(expected)
            for key, (a, b) in expected.items():
                assert torch.equal(loaded.weights[key][0].float(), a) and torch.equal(loaded.weights[key][1].float(), b)
        assert {m for _, m in loaded.weights} == {"gate_up_proj", "o_proj"}
        root = next(iter(adapter_dirs.values())).parent      # the store's allowed register root
        llama_style = save_random_adapters(model_dir, root, {"q-only": dict(r=2, lora_alpha=2,
                                                                             target_modules=["qkv_proj"])}, 1)
        (llama_style["q-only"] / "adapter_config.json").write_text(
            (llama_style["q-only"] / "adapter_config.json").read_text().replace('"qkv_proj"', '"q_proj"'))
        with pytest.raises(AdapterValidationError, match="q_proj.*not a linear layer of the served base"):
            store.register_path("q-only", llama_style["q-only"])
    finally:
        store.close()
