"""Adapters with a resized vocabulary: their tokenizer files at upload (real `tokenizers` JSON).

The fake base has VOCAB = 96 tokens ("t0".."t95", a WordLevel tokenizer); a resized adapter's
embed_tokens / lm_head tables have V' rows and its tokenizer adds tokens after the base's.
"""

from __future__ import annotations

import json

import pytest
import torch

from loraplex.adapters_store.errors import AdapterValidationError
from loraplex.adapters_store.upload import UploadMeta
from loraplex.adapters_store.paths import CONFIG_NAME, WEIGHTS_NAME
from store_adapters import EMBED, LM_HEAD, VOCAB, adapter_bytes, adapter_tensors, blob_digests, make_store, sha256, snapshot

BASE_TOKENS = tuple(f"t{i}" for i in range(VOCAB))


def tokenizer_json(tokens: list[str]) -> bytes:
    """A real `tokenizers` WordLevel tokenizer over `tokens` (id = position)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0]))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer.to_str().encode()


def resized_bytes(rows: int = VOCAB + 4) -> tuple[bytes, bytes]:
    tensors = {**adapter_tensors(), f"{EMBED}.weight": torch.randn(rows, 64), f"{LM_HEAD}.weight": torch.randn(rows, 64)}
    return adapter_bytes(modules_to_save=["embed_tokens", "lm_head"], tensors=tensors)


GOOD_FILES = {"tokenizer.json": tokenizer_json(list(BASE_TOKENS) + ["<new1>", "<new2>"]),
              "tokenizer_config.json": json.dumps({"eos_token": "t2", "model_max_length": 10**30}).encode(),
              "special_tokens_map.json": json.dumps({"eos_token": "t2"}).encode()}


def upload_with(store, name: str, config_bytes: bytes, weights_bytes: bytes, files: dict[str, bytes]):
    meta = UploadMeta(name=name, config_size=len(config_bytes), config_sha256=sha256(config_bytes),
                      weights_size=len(weights_bytes), weights_sha256=sha256(weights_bytes),
                      tokenizer_files=tuple((n, len(data), sha256(data)) for n, data in files.items()))
    with store.begin_upload(meta) as session:
        session.write(CONFIG_NAME, config_bytes)
        session.write(WEIGHTS_NAME, weights_bytes)
        for file_name, data in files.items():
            for start in range(0, len(data), 4096):
                session.write(file_name, data[start:start + 4096])
        return session.commit()


@pytest.fixture
def store(tmp_path):
    store = make_store(tmp_path / "store", max_tokenizer_bytes=64 * 1024)
    store.set_base_tokens(BASE_TOKENS)
    yield store
    store.close()


def test_resized_adapter_is_stored_with_its_tokenizer(store):
    record = upload_with(store, "resized", *resized_bytes(), GOOD_FILES)
    assert (record.vocab_size, record.resized_vocab) == (VOCAB + 4, True)
    assert store.tokenizer_files(record.key) == {name: data.decode() for name, data in GOOD_FILES.items()}
    loaded = store.load(record.key)
    assert loaded.vocab.embed_table.shape == (VOCAB + 4, 64) and loaded.vocab.lm_head_table.shape == (VOCAB + 4, 64)
    assert store.resolve("resized", None).vocab_size == VOCAB + 4     # the registry row round-trips
    assert record.tokenizer_sha256 in blob_digests(store)
    store.delete("resized", None)
    assert record.tokenizer_sha256 not in blob_digests(store)     # removed with its version


def test_tokenizer_files_are_ignored_without_a_resized_vocabulary(store):
    record = upload_with(store, "plain", *adapter_bytes(), GOOD_FILES)
    assert (record.vocab_size, record.tokenizer_sha256, record.resized_vocab) == (0, None, False)


def _refusal(store, weights: tuple[bytes, bytes], files: dict[str, bytes]) -> AdapterValidationError:
    before = snapshot(store)
    with pytest.raises(AdapterValidationError) as caught:
        upload_with(store, "bad", *weights, files)
    assert snapshot(store) == before          # nothing stored
    return caught.value


BAD_TOKENIZERS = {  # case -> (files, rule, parts of the message)
    "missing": ({}, "tokenizer", ["tokenizer.json is missing", f"{VOCAB + 4} tokens", f"base has {VOCAB}"]),
    "too_many_tokens": ({"tokenizer.json": tokenizer_json(list(BASE_TOKENS) + [f"<n{i}>" for i in range(6)])},
                        "tokenizer", ["tokenizer.json has 102 tokens", f"{VOCAB + 4} rows"]),
    "adds_none": ({"tokenizer.json": tokenizer_json(list(BASE_TOKENS))}, "tokenizer", ["adds none"]),
    "other_base": ({"tokenizer.json": tokenizer_json(["t0", "t1", "x2"] + list(BASE_TOKENS[3:]) + ["<n>"])},
                   "tokenizer", ["id 2 is 'x2'", "base tokenizer's is 't2'"]),
    "auto_map": ({**GOOD_FILES, "tokenizer_config.json": json.dumps(
        {"auto_map": {"AutoTokenizer": ["tok.MyTokenizer", None]}}).encode()},
        "tokenizer", ["tokenizer_config.json has 'auto_map'", "never loads"]),
    "not_json": ({**GOOD_FILES, "special_tokens_map.json": b"{not json"}, "tokenizer",
                 ["special_tokens_map.json is not valid JSON"]),
    "not_a_tokenizer": ({"tokenizer.json": b'{"model": 3}'}, "tokenizer", ["tokenizers library can load"]),
}


@pytest.mark.parametrize("case", sorted(BAD_TOKENIZERS))
def test_bad_tokenizer_files_are_refused_naming_the_file(store, case):
    files, rule, parts = BAD_TOKENIZERS[case]
    error = _refusal(store, resized_bytes(), files)
    assert error.rule == rule
    for part in parts:
        assert part in error.detail, (part, error.detail)


def test_oversized_tokenizer_file_is_refused_before_any_byte(store):
    big = {"tokenizer.json": b" " * (64 * 1024 + 1)}
    with pytest.raises(AdapterValidationError) as caught:
        upload_with(store, "big", *resized_bytes(), big)
    assert caught.value.rule == "tokenizer" and "tokenizer.json is 65537 bytes" in caught.value.detail


def test_python_files_are_not_tokenizer_files(store):
    with pytest.raises(AdapterValidationError) as caught:
        upload_with(store, "code", *resized_bytes(), {**GOOD_FILES, "tokenization_custom.py": b"import os"})
    assert caught.value.rule == "tokenizer" and "'tokenization_custom.py'" in caught.value.detail


def test_shrunk_vocabulary_is_refused(store):
    error = _refusal(store, resized_bytes(rows=VOCAB - 2), GOOD_FILES)
    assert error.rule == "vocab_size" and "shrunk vocabulary" in error.detail and f"{VOCAB - 2} tokens" in error.detail


def test_without_the_base_tokenizer_a_resized_adapter_is_refused(tmp_path):
    store = make_store(tmp_path / "store")
    try:
        error = _refusal(store, resized_bytes(), GOOD_FILES)
        assert error.rule == "tokenizer" and "does not know its base model's tokenizer" in error.detail
    finally:
        store.close()


def test_register_path_copies_the_tokenizer_files(tmp_path):
    store = make_store(tmp_path / "store")
    store.set_base_tokens(BASE_TOKENS)
    directory = tmp_path / "adapters" / "resized"
    directory.mkdir(parents=True)
    config_bytes, weights_bytes = resized_bytes()
    (directory / CONFIG_NAME).write_bytes(config_bytes)
    (directory / WEIGHTS_NAME).write_bytes(weights_bytes)
    for name, data in GOOD_FILES.items():
        (directory / name).write_bytes(data)
    try:
        record = store.register_path("resized", directory)
        assert record.resized_vocab and set(store.tokenizer_files(record.key)) == set(GOOD_FILES)
    finally:
        store.close()


def test_adapter_tokenizers_choose_and_cache_per_version(store):
    """The engine's per-request choice: the base's tokenizer for the base, unknown and plain
    adapters; the adapter's own for each resized version, loaded once, at most max_cached kept."""
    from loraplex.server.engine.adapter_tokenizers import AdapterTokenizers

    base = object()
    upload_with(store, "plain", *adapter_bytes(), {})
    for seed in range(3):                       # versions 1..3 of one resized adapter
        upload_with(store, "resized", *resized_bytes(), GOOD_FILES)
    tokenizers = AdapterTokenizers(base, VOCAB, store, max_cached=2)
    for ref in (None, "plain", "missing"):
        assert tokenizers.for_request(ref, None).tokenizer is base
    own = tokenizers.for_request("resized@1", None)
    assert (own.adapter_key, own.vocab_size, own.is_base) == ("resized@1", VOCAB + 4, False)
    assert own.tokenizer.convert_ids_to_tokens([VOCAB, VOCAB + 1]) == ["<new1>", "<new2>"]
    assert tokenizers.for_request("resized@1", None) is own                 # cached
    tokenizers.for_request("resized@2", None)
    tokenizers.for_request("resized", None)                                 # resized@3
    assert tokenizers.for_request("resized@1", None) is not own             # evicted (2 kept), loaded again
