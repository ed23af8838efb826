"""Hypothesis over the classes of issue 16 (tests/hostile_json.py): hostile JSON values put into
adapter_config.json fields and into the safetensors header, duplicate keys, pathological target
regexes. Every upload is refused with AdapterValidationError (never another exception, never a
hang) and nothing is stored."""

from __future__ import annotations

import json
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostile_json import HOSTILE_VALUES, PATHOLOGICAL_REGEXES, duplicate_key_object
from loraplex.adapters_store.errors import AdapterValidationError
from store_adapters import adapter_bytes, adapter_config, make_store, snapshot, upload

FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
CONFIG_FIELDS = ("r", "lora_alpha", "task_type", "use_rslora", "lora_dropout", "new_field")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = make_store(tmp_path_factory.mktemp("store"))
    yield store
    store.close()


def _config_with(field: str, raw: str, duplicate: bool) -> bytes:
    text = json.dumps({k: v for k, v in adapter_config().items() if k != field})
    if duplicate:       # the field appears twice: a valid value, then the hostile one
        valid = json.dumps(adapter_config().get(field, 1))
        return (text[:-1] + f', "{field}": {valid}, "{field}": {raw}}}').encode()
    return (text[:-1] + f', "{field}": {raw}}}').encode()


def _weights_with(raw: str, where: str) -> bytes:
    weights = adapter_bytes()[1]
    (length,) = struct.unpack("<Q", weights[:8])
    header = json.loads(weights[8:8 + length])
    pairs = [(k, json.dumps(v)) for k, v in header.items()]
    key, entry = pairs[0]
    if where == "metadata":
        pairs.insert(0, ("__metadata__", f'{{"note": {raw}}}'))
    elif where == "shape":
        pairs[0] = (key, entry.replace('"shape": [', f'"shape": [{raw}, ', 1))
    elif where == "offset":
        pairs[0] = (key, entry.replace('"data_offsets": [', f'"data_offsets": [{raw}, ', 1))
    elif where == "extra_field":
        pairs[0] = (key, entry[:-1] + f', "extra": {raw}}}')
    else:                                                  # duplicate key inside the entry
        pairs[0] = (key, entry[:-1] + f', "dtype": {raw}}}')
    text = "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in pairs) + "}"
    raw_bytes = text.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(raw_bytes)) + raw_bytes + weights[8 + length:]


def _refused(store, config_bytes: bytes, weights_bytes: bytes) -> AdapterValidationError:
    before = snapshot(store)
    with pytest.raises(AdapterValidationError) as caught:
        upload(store, "fuzzed", config_bytes, weights_bytes)
    assert snapshot(store) == before
    return caught.value


@FUZZ
@given(field=st.sampled_from(CONFIG_FIELDS), raw=HOSTILE_VALUES, duplicate=st.booleans())
def test_hostile_config_values_are_refused(store, field, raw, duplicate):
    harmless = field in ("task_type", "lora_dropout", "new_field", "use_rslora")
    if harmless and raw in ("1e300", "3e38", "-3.5e38", "1e-400") and not duplicate:
        return                           # a finite float in a field serving ignores is not hostile
    if field == "lora_alpha" and raw == "1e-400" and not duplicate:
        return                           # underflows to 0.0: refused as zero, covered elsewhere
    _refused(store, _config_with(field, raw, duplicate), adapter_bytes()[1])


@FUZZ
@given(raw=HOSTILE_VALUES, where=st.sampled_from(["metadata", "shape", "offset", "extra_field", "duplicate"]))
def test_hostile_header_values_are_refused(store, raw, where):
    if where == "metadata" and raw.startswith('"') is False and raw[0] not in "[{":
        raw = f'"x", "n": {raw}'         # metadata must map strings to strings: put it beside one
    _refused(store, adapter_bytes()[0], _weights_with(raw, where))


@FUZZ
@given(key=st.sampled_from(["r", "lora_alpha", "peft_type", "target_modules"]))
def test_duplicate_config_keys_are_refused(store, key):
    config = adapter_config()
    text = json.dumps(config)
    value = json.dumps(config[key])
    raw = text[:-1] + ", " + duplicate_key_object(key, value, value)[1:]
    assert _refused(store, raw.encode(), adapter_bytes()[1]).rule == "config_json"


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(pattern=PATHOLOGICAL_REGEXES)
def test_pathological_target_regexes_are_refused_quickly(store, pattern):
    started = time.monotonic()
    config = json.dumps(adapter_config(target_modules=pattern)).encode()
    _refused(store, config, adapter_bytes()[1])
    assert time.monotonic() - started < 10
