"""Store outages reach callers as a generic message with an incident id (issue 37 item 10), on
gRPC and HTTP alike: the backend's own text names internal endpoints and stays in the log."""

from __future__ import annotations

import logging

import grpc
import pytest

from loraplex.adapters_store.errors import StoreUnavailable
from loraplex.server.engine.io import AdapterBackendUnavailable
from loraplex.server.http.errors import to_api_error
from loraplex.server.service.errors import map_error

INTERNAL = ("postgresql://postgres:***@/loraplex?host=/tmp/pg-sock could not connect",
            "http://10.0.0.9:9000/loraplex-bucket/blobs/ab/cd: connect timeout")


@pytest.mark.parametrize("error", [StoreUnavailable(INTERNAL[0]), StoreUnavailable(INTERNAL[1], retry_after_s=3),
                                   AdapterBackendUnavailable(INTERNAL[1])])
def test_outages_name_no_endpoint_to_callers_and_log_it(error, caplog):
    caplog.set_level(logging.WARNING)
    mapped = map_error(error)
    assert mapped.code is grpc.StatusCode.UNAVAILABLE and mapped.retry_after_s == error.retry_after_s
    answered = to_api_error(error)
    assert answered.status == 503 and answered.headers["Retry-After"] == str(round(error.retry_after_s))
    for message in (mapped.message, answered.message):
        assert message.startswith("the adapter store is unavailable; retry shortly (incident ")
        assert "postgres" not in message and "10.0.0.9" not in message and "bucket" not in message
        incident = message.rsplit("incident ", 1)[1].rstrip(")")
        assert any(incident in record.getMessage() and str(error) in record.getMessage()
                   for record in caplog.records)
