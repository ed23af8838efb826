"""Shared-store settings: flags/env parse and validate; backend outages map to UNAVAILABLE with a retry hint."""

from __future__ import annotations

import grpc
import pytest

from loraplex.adapters_store.errors import SchemaError, StoreUnavailable
from loraplex.adapters_store.urls import parse_s3_url, redact_url
from loraplex.server.config import ConfigError, load_server_config
from loraplex.server.engine.io import AdapterBackendUnavailable
from loraplex.server.service.errors import map_error


def test_store_flags_come_from_env_and_the_password_stays_out_of_repr():
    config = load_server_config({}, {"LORAPLEX_STORE_REGISTRY": "postgresql://u:pw-secret@db:5432/a",
                                     "LORAPLEX_STORE_BLOBS": "s3://bucket/prod",
                                     "LORAPLEX_ADAPTER_SOURCE": "s3://models/lora,s3://models/other",
                                     "LORAPLEX_BLOB_CACHE_BYTES": "2GiB"})
    assert config.store_blobs == "s3://bucket/prod" and config.blob_cache_bytes == 2 * 2**30
    assert config.adapter_sources == ("s3://models/lora", "s3://models/other")
    assert "pw-secret" not in repr(config)


@pytest.mark.parametrize("values, fragment", [
    ({"store_registry": "mysql://u:pw-secret@db/a"}, "--store-registry"),
    ({"store_blobs": "gs://bucket/x"}, "--store-blobs"),
    ({"store_blobs": "s3://bucket/a/../b"}, "'..'"),
    ({"adapter_sources": ["s3://bucket/a/../b"]}, "--adapter-source"),
])
def test_bad_store_urls_are_refused_at_start(values, fragment):
    with pytest.raises(ConfigError) as error:
        load_server_config(values, {})
    assert fragment in str(error.value) and "pw-secret" not in str(error.value)


def test_urls_parse_and_redact():
    assert redact_url("postgresql://u:p@h:5/db?sslmode=require") == "postgresql://u:***@h:5/db?sslmode=require"
    assert redact_url("postgresql:///db?host=/tmp") == "postgresql:///db?host=/tmp"
    location = parse_s3_url("s3://bucket/team/a/")
    assert (location.bucket, location.prefix) == ("bucket", "team/a")
    assert parse_s3_url("s3://bucket/team").contains(location)
    assert not parse_s3_url("s3://bucket/tea").contains(location)
    for bad in ("s3://bucket/a//b", "s3://bucket/./a", "s3://b/a\\b", "http://b/a", "s3:///a"):
        with pytest.raises(ValueError):
            parse_s3_url(bad)


def test_backend_outages_map_to_unavailable_with_retry_info():
    for error in (StoreUnavailable("the adapter registry postgresql://u:***@h/db is unreachable"),
                  AdapterBackendUnavailable("adapter a@1 cannot be served: the blob store is unreachable")):
        mapped = map_error(error)
        assert mapped.code is grpc.StatusCode.UNAVAILABLE and mapped.retry_after_s and mapped.retry_after_s > 0
    assert map_error(SchemaError("newer")).code is grpc.StatusCode.FAILED_PRECONDITION
