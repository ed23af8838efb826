"""A corpus of bad adapters: each is refused with its own rule and message, and nothing is stored."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import threading

import pytest
import torch

from loraplex.adapters_store.errors import (AdapterValidationError, InvalidAdapterId, PermissionDenied,
                                            StoreError)
from loraplex.adapters_store.paths import CONFIG_NAME, WEIGHTS_NAME
from loraplex.adapters_store.upload import UploadMeta
from store_adapters import (EMBED, LM_HEAD, VOCAB, adapter_bytes, adapter_config, adapter_tensors, make_store, sha256, snapshot,
                            tensor_key, upload, write_adapter)


def _with(tensors: dict, key: str, value: torch.Tensor) -> dict:
    return {**tensors, key: value}


def _nan_tensors() -> dict:
    tensors = adapter_tensors()
    a = tensors[tensor_key(1, "v_proj", "A")].clone()
    a[0, 3] = float("nan")
    return _with(tensors, tensor_key(1, "v_proj", "A"), a)


def _inf_tensors() -> dict:
    tensors = adapter_tensors()
    b = tensors[tensor_key(0, "q_proj", "B")].clone()
    b[5, 1] = float("-inf")
    return _with(tensors, tensor_key(0, "q_proj", "B"), b)


def _huge_header() -> bytes:
    return struct.pack("<Q", 2 * 2**20) + b'{"a": 1}' + b" " * 64


def _without(config: dict, key: str) -> dict:
    return {k: v for k, v in config.items() if k != key}


def _magnitude_key(layer: int, module: str) -> str:
    return tensor_key(layer, module, "A").replace("lora_A.weight", "lora_magnitude_vector")


def _dora_tensors(shape=None, dtype=torch.float32, fill: float = 1.0) -> dict:
    """A DoRA adapter's tensors on q_proj/v_proj; the magnitude of layer 1 v_proj altered."""
    tensors = adapter_tensors()
    for layer in (0, 1):
        tensors[_magnitude_key(layer, "q_proj")] = torch.ones(64)
        tensors[_magnitude_key(layer, "v_proj")] = torch.ones(32)
    tensors[_magnitude_key(1, "v_proj")] = torch.full(shape or (32,), fill).to(dtype)
    return tensors


def _tensors_without_b() -> dict:
    tensors = adapter_tensors()
    del tensors[tensor_key(1, "q_proj", "B")]
    return tensors


# name -> (config bytes, weights bytes, expected rule); uploaded through begin_upload/commit.
UPLOAD_CASES = {
    "pickle_bin": lambda: (adapter_bytes()[0], pickle.dumps(adapter_tensors(), protocol=4), "pickle_format"),
    "torch_save_zip": lambda: (adapter_bytes()[0], _torch_save(adapter_tensors()), "pickle_format"),
    "wrong_shape": lambda: (*adapter_bytes(tensors=_with(adapter_tensors(), tensor_key(0, "q_proj", "A"),
                                                         torch.zeros(4, 32))), "shape"),
    "rank_above_limit": lambda: (*adapter_bytes(rank=32), "rank_limit"),
    "nan_weights": lambda: (*adapter_bytes(tensors=_nan_tensors()), "non_finite"),
    "inf_weights": lambda: (*adapter_bytes(tensors=_inf_tensors()), "non_finite"),
    "truncated_safetensors": lambda: (adapter_bytes()[0], adapter_bytes()[1][:-100], "truncated"),
    "oversized_header": lambda: (adapter_bytes()[0], _huge_header(), "header_size"),
    "wrong_base_fingerprint": lambda: (*adapter_bytes(loraplex_base_fingerprint="llama:2x64:kv32:ffn128:bnb-nf4"),
                                       "base_fingerprint"),
    "missing_r": lambda: (*adapter_bytes(config=_without(adapter_config(), "r")), "config_missing_field"),
    "missing_peft_type": lambda: (*adapter_bytes(config=_without(adapter_config(), "peft_type")),
                                  "config_missing_field"),
    "missing_lora_alpha": lambda: (*adapter_bytes(config=_without(adapter_config(), "lora_alpha")),
                                   "config_missing_field"),
    "missing_target_modules": lambda: (json.dumps(_without(adapter_config(), "target_modules")).encode(),
                                       adapter_bytes()[1], "config_missing_field"),
    "unknown_peft_type": lambda: (*adapter_bytes(peft_type="IA3"), "peft_type"),
    "dora_without_magnitudes": lambda: (*adapter_bytes(use_dora=True), "dora_magnitude"),
    "magnitude_without_dora": lambda: (*adapter_bytes(tensors=_with(adapter_tensors(), _magnitude_key(0, "q_proj"),
                                                                    torch.ones(64))), "dora_magnitude"),
    "dora_magnitude_wrong_shape": lambda: (*adapter_bytes(use_dora=True, tensors=_dora_tensors(shape=(64,))),
                                           "shape"),
    "dora_magnitude_int": lambda: (*adapter_bytes(use_dora=True, tensors=_dora_tensors(dtype=torch.int32)),
                                   "dtype"),
    "dora_magnitude_nan": lambda: (*adapter_bytes(use_dora=True, tensors=_dora_tensors(fill=float("nan"))),
                                   "non_finite"),
    "use_dora_not_bool": lambda: (*adapter_bytes(use_dora="yes"), "config_field"),
    "modules_to_save_decoder": lambda: (*adapter_bytes(modules_to_save=["model.norm", "lm_head"]),
                                        "modules_to_save"),
    "modules_to_save_and_target": lambda: (*adapter_bytes(targets=("q_proj", "lm_head"), modules_to_save=["lm_head"],
                                                          tensors=adapter_tensors()), "modules_to_save"),
    "modules_to_save_missing_table": lambda: (*adapter_bytes(modules_to_save=["embed_tokens"]), "missing_pair"),
    "modules_to_save_resized_vocab": lambda: (*adapter_bytes(modules_to_save=["lm_head"], tensors=_with(
        adapter_tensors(), f"{LM_HEAD}.weight", torch.zeros(VOCAB + 3, 64))), "vocab_size"),
    "modules_to_save_table_int": lambda: (*adapter_bytes(modules_to_save=["embed_tokens"], tensors=_with(
        adapter_tensors(), f"{EMBED}.weight", torch.zeros(VOCAB, 64, dtype=torch.int8))), "dtype"),
    "embedding_lora_wrong_shape": lambda: (*adapter_bytes(targets=("q_proj", "v_proj", "embed_tokens"), tensors={
        **adapter_tensors(), f"{EMBED}.lora_embedding_A": torch.zeros(3, VOCAB),
        f"{EMBED}.lora_embedding_B": torch.zeros(64, 4)}), "shape"),
    "embedding_lora_resized_vocab": lambda: (*adapter_bytes(targets=("q_proj", "v_proj", "embed_tokens"), tensors={
        **adapter_tensors(), f"{EMBED}.lora_embedding_A": torch.zeros(4, VOCAB + 5),
        f"{EMBED}.lora_embedding_B": torch.zeros(64, 4)}), "vocab_size"),
    "lm_head_lora_resized_vocab": lambda: (*adapter_bytes(targets=("q_proj", "v_proj", "lm_head"), tensors={
        **adapter_tensors(), f"{LM_HEAD}.lora_A.weight": torch.zeros(4, 64),
        f"{LM_HEAD}.lora_B.weight": torch.zeros(VOCAB - 2, 4)}), "vocab_size"),
    "embedding_lora_missing_b": lambda: (*adapter_bytes(targets=("q_proj", "v_proj", "embed_tokens"), tensors={
        **adapter_tensors(), f"{EMBED}.lora_embedding_A": torch.zeros(4, VOCAB)}), "missing_pair"),
    "dora_on_embedding": lambda: (*adapter_bytes(use_dora=True, targets=("q_proj", "embed_tokens"),
                                                 tensors=adapter_tensors()), "use_dora"),
    "embedding_target": lambda: (json.dumps(adapter_config(targets=("q_proj", "wte"))).encode(),
                                 adapter_bytes()[1], "embedding_target"),
    "lm_head_tensor": lambda: (*adapter_bytes(tensors=_with(adapter_tensors(), "base_model.model.lm_head.lora_A.weight",
                                                            torch.zeros(4, 64))), "target_mismatch"),
    "rank_pattern_differs": lambda: (*adapter_bytes(rank_pattern={"q_proj": 8}), "rank_pattern"),
    "rank_r_not_int": lambda: (*adapter_bytes(config=adapter_config(rank="4")), "config_field"),
    "float64_weights": lambda: (*adapter_bytes(tensors=adapter_tensors(dtype=torch.float64)), "dtype"),
    "missing_lora_b": lambda: (*adapter_bytes(tensors=_tensors_without_b()), "missing_pair"),
    "layer_out_of_range": lambda: (*adapter_bytes(tensors=_with(adapter_tensors(), tensor_key(7, "q_proj", "A"),
                                                                torch.zeros(4, 64))), "layer_range"),
    "untargeted_module": lambda: (*adapter_bytes(tensors=adapter_tensors(targets=("q_proj", "v_proj", "o_proj")),
                                                 config=adapter_config()), "target_mismatch"),
    "config_not_json": lambda: (b"{r: 4", adapter_bytes()[1], "config_json"),
    "header_not_json": lambda: (adapter_bytes()[0], struct.pack("<Q", 6) + b"{nope!", "header_json"),
    # issue 16: values finite or well-formed for Python's json, hostile downstream
    "alpha_1e300": lambda: (*adapter_bytes(config=_scaled_config(1e300)), "scaling"),
    "alpha_3e38": lambda: (*adapter_bytes(config=_scaled_config(3e38)), "scaling"),
    "r_5000_digits": lambda: (_config_text(r="7" * 5000), adapter_bytes()[1], "config_json"),
    "alpha_10_pow_400": lambda: (_config_text(lora_alpha=str(10**400)), adapter_bytes()[1], "config_json"),
    "config_deep_nesting": lambda: (_config_text(task_type="[" * 50000 + "]" * 50000), adapter_bytes()[1],
                                    "config_json"),
    "header_deep_nesting": lambda: (adapter_bytes()[0], _edit_header(
        lambda p: [("__metadata__", "[" * 50000 + "]" * 50000)] + p), "header_json"),
    "header_huge_shape": lambda: (adapter_bytes()[0], _edit_header(_header_huge_shape), "header_json"),
    "header_extra_nan": lambda: (adapter_bytes()[0], _edit_header(lambda p: _with_field(p, '"extra": NaN')),
                                 "header_json"),
    "header_duplicate_dtype": lambda: (adapter_bytes()[0], _edit_header(
        lambda p: _with_field(p, '"dtype": "F32"')), "header_json"),
    "header_lone_surrogate": lambda: (adapter_bytes()[0], _edit_header(
        lambda p: [("__metadata__", '{"format": "\\ud800"}')] + p), "header_json"),
    "header_duplicate_tensor": lambda: (adapter_bytes()[0], _edit_header(lambda p: p + p[:1]),
                                        "duplicate_tensor"),
    "layer_arabic_indic_digit": lambda: (*adapter_bytes(tensors=_arabic_indic_layer_tensors()), "tensor_name"),
    "target_regex_backtracking": lambda: (json.dumps(adapter_config(
        target_modules=r"model\.layers\.0\.(?:.|.|.)*Z")).encode(), adapter_bytes()[1], "config_field"),
}


def _config_text(**replace: str) -> bytes:
    """adapter_config.json text with some values replaced by raw JSON text (e.g. huge numbers)."""
    text = json.dumps(adapter_config())
    for key, raw in replace.items():
        text = text.replace(f'"{key}": {json.dumps(adapter_config()[key])}', f'"{key}": {raw}')
    return text.encode()


def _header_pairs() -> tuple[list[tuple[str, str]], bytes]:
    """The good weights file's header as (key, raw JSON value text) pairs, and its data section."""
    weights = adapter_bytes()[1]
    (length,) = struct.unpack("<Q", weights[:8])
    header = json.loads(weights[8:8 + length])
    return [(key, json.dumps(value)) for key, value in header.items()], weights[8 + length:]


def _edit_header(edit) -> bytes:
    """A weights file whose header is `edit(pairs)` joined as JSON text (duplicates, NaN allowed)."""
    pairs, data = _header_pairs()
    text = "{" + ", ".join(f"{json.dumps(key)}: {value}" for key, value in edit(pairs)) + "}"
    raw = text.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(raw)) + raw + data


def _with_field(pairs, raw_field: str):
    """The first tensor's entry gains `raw_field` (e.g. '"dtype": "F32"') as an extra member."""
    (key, value), rest = pairs[0], pairs[1:]
    return [(key, value[:-1] + ", " + raw_field + "}")] + rest


def _header_huge_shape(pairs):
    (key, value), rest = pairs[0], pairs[1:]
    return [(key, value.replace('"shape": [', '"shape": [' + "9" * 5000 + ", ", 1))] + rest


def _arabic_indic_layer_tensors() -> dict:
    tensors = adapter_tensors()
    for factor in "AB":
        tensors[tensor_key(0, "q_proj", factor).replace("layers.0.", "layers.\u0660.".encode().decode("unicode_escape"))] = \
            tensors.pop(tensor_key(0, "q_proj", factor))
    return tensors


def _scaled_config(alpha: float) -> dict:
    return adapter_config(alpha=alpha)


def _torch_save(tensors: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return buffer.getvalue()


@pytest.fixture
def store(tmp_path):
    store = make_store(tmp_path / "store")
    upload(store, "good", *adapter_bytes(seed=1))
    yield store
    store.close()


def _assert_nothing_stored(store, before) -> None:
    assert snapshot(store) == before
    assert store.load("good@1").key == "good@1"            # the adapter stored before is intact


@pytest.mark.parametrize("case", sorted(UPLOAD_CASES))
def test_bad_upload_is_refused_with_its_rule_and_nothing_stored(store, case):
    config_bytes, weights_bytes, rule = UPLOAD_CASES[case]()
    before = snapshot(store)
    with pytest.raises(AdapterValidationError) as caught:
        upload(store, f"bad-{case.replace('_', '-')}", config_bytes, weights_bytes)
    assert caught.value.rule == rule, str(caught.value)
    _assert_nothing_stored(store, before)


def test_every_rule_has_its_own_message(store):
    messages = {}
    for case, make in UPLOAD_CASES.items():
        with pytest.raises(AdapterValidationError) as caught:
            upload(store, "bad", *make()[:2])
        messages[case] = caught.value.detail
    assert len(set(messages.values())) == len(messages), messages


def test_resized_vocabulary_refusal_names_what_and_why(store):
    """A resized lm_head table without the embed_tokens one: the refusal says which tensor, both
    vocabulary sizes, and what serving it needs (both tables whole)."""
    config_bytes, weights_bytes, _ = UPLOAD_CASES["modules_to_save_resized_vocab"]()
    with pytest.raises(AdapterValidationError) as caught:
        upload(store, "resized", config_bytes, weights_bytes)
    detail = caught.value.detail
    for part in (f"{LM_HEAD}.weight", f"{VOCAB + 3} tokens", f"served base has {VOCAB}", "embed_tokens is not in "
                 "modules_to_save", 'modules_to_save=["embed_tokens", "lm_head"]'):
        assert part in detail, (part, detail)


def test_mismatched_sha256_is_refused_at_commit(store):
    config_bytes, weights_bytes = adapter_bytes(seed=5)
    before = snapshot(store)
    meta = UploadMeta("bad", len(config_bytes), sha256(config_bytes), len(weights_bytes), sha256(b"other"))
    session = store.begin_upload(meta)
    session.write(CONFIG_NAME, config_bytes)
    session.write(WEIGHTS_NAME, weights_bytes)
    with pytest.raises(AdapterValidationError, match="sha256") as caught:
        session.commit()
    assert caught.value.rule == "sha256_mismatch"
    _assert_nothing_stored(store, before)


def test_wrong_fingerprint_is_accepted_with_the_operator_override(store):
    record = upload(store, "loftq", *adapter_bytes(loraplex_base_fingerprint="other-base"), allow_base_mismatch=True)
    assert record.config.base_fingerprint == "other-base"


@pytest.mark.parametrize("bad_id", ["../x", "/etc/passwd", "a/../../b", "a..b", "", ".hidden", "x" * 129, "a b",
                                    "nl\n", "x@1\n", "\u0661a"])
def test_traversal_and_unsafe_ids_are_refused(store, tmp_path, bad_id):
    before = snapshot(store)
    config_bytes, weights_bytes = adapter_bytes()
    with pytest.raises(InvalidAdapterId):
        upload(store, bad_id, config_bytes, weights_bytes)
    write_adapter(tmp_path / "adapters" / "ok")
    with pytest.raises(InvalidAdapterId):
        store.register_path(bad_id, tmp_path / "adapters" / "ok")
    assert snapshot(store) == before


def _register_cases(tmp_path):
    roots = tmp_path / "adapters"
    outside = write_adapter(tmp_path / "outside" / "evil")
    write_adapter(roots / "ok")
    (roots / "dir-link").symlink_to(outside, target_is_directory=True)
    file_link = write_adapter(roots / "file-link")
    os.unlink(file_link / WEIGHTS_NAME)
    (file_link / WEIGHTS_NAME).symlink_to(outside / WEIGHTS_NAME)
    pickles = roots / "pickles"
    pickles.mkdir()
    (pickles / CONFIG_NAME).write_text(json.dumps(adapter_config()))
    torch.save(adapter_tensors(), pickles / "adapter_model.bin")
    return {
        "dotdot_path": (roots / "ok" / ".." / ".." / "outside" / "evil", PermissionDenied),
        "absolute_escape": ("/etc", PermissionDenied),
        "relative_escape": ("../outside/evil", PermissionDenied),
        "symlinked_dir_escape": (roots / "dir-link", PermissionDenied),
        "symlinked_file_escape": (file_link, PermissionDenied),
        "pickle_only_dir": (pickles, AdapterValidationError),
    }


@pytest.mark.parametrize("case", ["dotdot_path", "absolute_escape", "relative_escape", "symlinked_dir_escape",
                                  "symlinked_file_escape", "pickle_only_dir"])
def test_register_path_escapes_and_pickles_are_refused(store, tmp_path, case):
    path, error_type = _register_cases(tmp_path)[case]
    before = snapshot(store)
    with pytest.raises(error_type) as caught:
        store.register_path("reg", path)
    assert isinstance(caught.value, StoreError) and str(caught.value)
    _assert_nothing_stored(store, before)


def test_register_path_inside_root_works_relative_and_absolute(store, tmp_path):
    write_adapter(tmp_path / "adapters" / "ok", seed=3)
    assert store.register_path("reg", tmp_path / "adapters" / "ok").version == 1
    assert store.register_path("reg", "ok").version == 2


def test_register_refused_without_allowed_roots(tmp_path):
    store = make_store(tmp_path / "store", allowed_register_roots=())
    write_adapter(tmp_path / "adapters" / "ok")
    with pytest.raises(PermissionDenied, match="allowed-register-root"):
        store.register_path("reg", tmp_path / "adapters" / "ok")
    store.close()


@pytest.mark.parametrize("fifo_name", [WEIGHTS_NAME, CONFIG_NAME])
def test_register_refuses_a_fifo_without_blocking(store, tmp_path, fifo_name):
    """Issue 16 item 5: a FIFO under the register root must not block a worker in open()."""
    directory = write_adapter(tmp_path / "adapters" / "fifo")
    os.unlink(directory / fifo_name)
    os.mkfifo(directory / fifo_name)
    before = snapshot(store)
    outcome: list[BaseException] = []
    worker = threading.Thread(target=lambda: _capture(outcome, store.register_path, "fifo", directory))
    worker.start()
    worker.join(timeout=30)
    if worker.is_alive():                         # unblock the open() so the thread can end
        fd = os.open(directory / fifo_name, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        worker.join(timeout=30)
        pytest.fail("register_path blocked opening a FIFO")
    assert len(outcome) == 1 and isinstance(outcome[0], AdapterValidationError), outcome
    assert "not a regular file" in str(outcome[0]) and str(tmp_path) not in str(outcome[0])
    _assert_nothing_stored(store, before)


def _capture(outcome: list, fn, *args) -> None:
    try:
        fn(*args)
        outcome.append(AssertionError("no error"))
    except BaseException as error:  # noqa: BLE001 - the test inspects it
        outcome.append(error)
