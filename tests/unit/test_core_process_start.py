"""A CoreProcess whose spawn fails closes its ZeroMQ pipes: otherwise the front end's
zmq.Context.term() (ProcessEngine.shutdown after a failed start) would block forever."""

from __future__ import annotations

import threading

import pytest
import zmq

from loraplex.server.engine.proc.process import CoreProcess


def test_a_failed_spawn_leaves_no_open_socket():
    context = zmq.Context()
    with pytest.raises(Exception) as failure:           # a lambda cannot be pickled for `spawn`
        CoreProcess(context, engine_config=lambda: None, store_factory=None)
    # the caller still holds the error (and through its traceback the half-built object), as
    # ProcessEngine.create does while it shuts down: its sockets must be closed already
    terminated = threading.Event()
    thread = threading.Thread(target=lambda: (context.term(), terminated.set()), daemon=True)
    thread.start()
    assert terminated.wait(30), "zmq.Context.term() blocked: the failed CoreProcess left a socket open"
    assert failure.value is not None
