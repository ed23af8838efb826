"""Every store test runs against both backend pairs: (SQLite, directory) and (PostgreSQL, S3).

The `store_backend` fixture is autouse and parametrized; it points `make_store` (and the
worker subprocesses, which inherit the environment) at a fresh database and bucket prefix
through LORAPLEX_TEST_STORE_REGISTRY / LORAPLEX_TEST_STORE_BLOBS.
"""

from __future__ import annotations

import pytest


@pytest.fixture(params=["local", "shared"], autouse=True)
def store_backend(request, monkeypatch):
    if request.param == "local":
        monkeypatch.delenv("LORAPLEX_TEST_STORE_REGISTRY", raising=False)
        monkeypatch.delenv("LORAPLEX_TEST_STORE_BLOBS", raising=False)
        return "local"
    postgres = request.getfixturevalue("postgres_service")
    s3 = request.getfixturevalue("s3_service")
    monkeypatch.setenv("LORAPLEX_TEST_STORE_REGISTRY", postgres.new_database())
    monkeypatch.setenv("LORAPLEX_TEST_STORE_BLOBS", s3.new_prefix())
    return "shared"



def pytest_collection_modifyitems(config, items):
    """Keep `make test` within budget: on the shared backends, run each test function once with its
    first parameter case (the other cases exercise validation, which the backends do not touch);
    the rest are marked slow (`make test-store-shared` runs all of them)."""
    seen: set[str] = set()
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("store_backend") != "shared":
            continue
        function = item.nodeid.split("[", 1)[0]
        if item.module.__name__.endswith("test_store_ids_cache") or function in seen:
            item.add_marker(pytest.mark.slow)
        seen.add(function)
