"""Adapter kinds beyond plain LoRA through the store: DoRA's magnitude vectors, LoRA on
embed_tokens / lm_head and modules_to_save tables are validated, stored, loaded and counted in
the host tier (DoRA with the engine's derived scales)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from loraplex.adapters_store.errors import AdapterValidationError
from store_adapters import (EMBED, FAKE_BASE, LM_HEAD, VOCAB, adapter_bytes, adapter_tensors, make_store,
                            tensor_key, upload)


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


def _vocab_lora_tensors(with_base_copies: bool) -> dict[str, torch.Tensor]:
    tensors = adapter_tensors()
    tensors[f"{EMBED}.lora_embedding_A"] = torch.randn(4, VOCAB)
    tensors[f"{EMBED}.lora_embedding_B"] = torch.randn(64, 4)
    tensors[f"{LM_HEAD}.lora_A.weight"] = torch.randn(4, 64)
    tensors[f"{LM_HEAD}.lora_B.weight"] = torch.randn(VOCAB, 4)
    if with_base_copies:      # PEFT's save_embedding_layers: copies of the base tables, ignored
        tensors[f"{EMBED}.base_layer.weight"] = torch.randn(VOCAB, 64)
        tensors[f"{LM_HEAD}.base_layer.weight"] = torch.randn(VOCAB, 64)
    return tensors


def test_vocabulary_adapters_are_stored_loaded_and_counted(tmp_path):
    store = make_store(tmp_path / "store")
    try:
        targets = ("q_proj", "v_proj", "embed_tokens", "lm_head")
        lora_key = upload(store, "vocab-lora", *adapter_bytes(targets=targets, tensors=_vocab_lora_tensors(True))).key
        tables = {**adapter_tensors(), f"{EMBED}.weight": torch.randn(VOCAB, 64, dtype=torch.bfloat16),
                  f"{LM_HEAD}.weight": torch.randn(VOCAB, 64, dtype=torch.float16)}
        saved_key = upload(store, "saved", *adapter_bytes(modules_to_save=["embed_tokens", "lm_head"],
                                                          tensors=tables)).key
        lora = store.load(lora_key)
        assert lora.config.target_modules == ("q_proj", "v_proj", "embed_tokens", "lm_head")
        assert [tuple(t.shape) for t in lora.vocab.embed_lora] == [(4, VOCAB), (64, 4)]
        assert [tuple(t.shape) for t in lora.vocab.lm_head_lora] == [(4, 64), (VOCAB, 4)]
        assert lora.vocab.embed_table is None and lora.vocab.lm_head_table is None     # base copies dropped
        saved = store.load(saved_key)
        assert saved.vocab.embed_lora is None and saved.vocab.embed_table.dtype == torch.float32
        torch.testing.assert_close(saved.vocab.lm_head_table, tables[f"{LM_HEAD}.weight"].float())
        for adapter in (lora, saved):
            decoder = sum(a.nbytes + b.nbytes for a, b in adapter.weights.values())
            assert adapter.nbytes == decoder + adapter.vocab.nbytes
        assert saved.vocab.nbytes == 2 * VOCAB * 64 * 4
        assert store.cache.stats().num_bytes == lora.nbytes + saved.nbytes
    finally:
        store.close()


def test_vocabulary_tables_count_against_the_size_limit_and_host_tier(tmp_path):
    tables = {**adapter_tensors(), f"{LM_HEAD}.weight": torch.randn(VOCAB, 64)}
    config, weights = adapter_bytes(modules_to_save=["lm_head"], tensors=tables)
    store = make_store(tmp_path / "small", max_adapter_bytes=len(weights) - 1, host_cache_bytes=16 * 2**10)
    try:
        with pytest.raises(AdapterValidationError) as refused:
            upload(store, "too-big", config, weights)
        assert refused.value.rule == "size_limit"
    finally:
        store.close()
    store = make_store(tmp_path / "tier", host_cache_bytes=16 * 2**10)    # below the table's 24 KiB
    try:
        loaded = store.load(upload(store, "saved", config, weights).key)
        assert loaded.nbytes > 16 * 2**10 and not store.cache.contains(loaded.key)
    finally:
        store.close()
