"""Adapter kinds beyond plain LoRA through the store: DoRA's magnitude vectors are validated,
stored, loaded and counted in the host tier (with the engine's derived scales)."""

from __future__ import annotations

from dataclasses import replace

import torch

from store_adapters import FAKE_BASE, adapter_bytes, adapter_tensors, make_store, tensor_key, upload


def _dora_tensors() -> dict[str, torch.Tensor]:
    tensors = adapter_tensors(targets=("q_proj", "down_proj"))
    for layer in range(FAKE_BASE.num_layers):
        for module in ("q_proj", "down_proj"):
            out_features = FAKE_BASE.module_shapes[module][1]
            key = tensor_key(layer, module, "A").replace("lora_A.weight", "lora_magnitude_vector")
            tensors[key] = torch.linspace(0.5, 1.5, out_features)
    return tensors


def test_dora_upload_loads_magnitudes_and_counts_derived_scales(tmp_path):
    store = make_store(tmp_path / "store")
    try:
        config, weights = adapter_bytes(use_dora=True, targets=("q_proj", "down_proj"), tensors=_dora_tensors())
        record = upload(store, "dora", config, weights)
        plain = store.load(upload(store, "plain", *adapter_bytes()).key)
        assert not plain.is_dora and not plain.magnitudes
        derived = torch.full((4,), 2.0)           # stands in for the engine's m / ||W + s BA||
        store.set_load_finisher(lambda a: replace(a, dora_scales={k: derived for k in a.magnitudes},
                                                  nbytes=a.nbytes + derived.nbytes * len(a.magnitudes)))
        loaded = store.load(record.key)
        assert loaded.is_dora and set(loaded.magnitudes) == {(l, m) for l in (0, 1) for m in ("q_proj", "down_proj")}
        torch.testing.assert_close(loaded.magnitudes[(1, "q_proj")], torch.linspace(0.5, 1.5, 64))
        raw = sum(a.nbytes + b.nbytes for a, b in loaded.weights.values())
        magnitudes = sum(m.nbytes for m in loaded.magnitudes.values())
        assert loaded.nbytes == raw + magnitudes + 4 * derived.nbytes
        assert store.cache.stats().num_bytes == loaded.nbytes + plain.nbytes
    finally:
        store.close()
