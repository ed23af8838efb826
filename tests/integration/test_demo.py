"""`loraplex demo`: trains the demo adapter, uploads it to a real server, and the replies with it
follow the learned format while the replies without it do not. Slow (training + a server
start): `make test-demo`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(2400)]


@pytest.fixture(scope="module")
def demo_adapter(tmp_path_factory, default_model_dir) -> Path:
    from loraplex.server.demo.walkthrough import ensure_adapter

    lines: list[str] = []
    out = tmp_path_factory.mktemp("demo") / "answer-format"
    ensure_adapter(out, lambda: default_model_dir, steps=12, log=lines.append)
    assert any("adapter saved" in line for line in lines)
    return out


def test_demo_against_a_running_server(default_model_dir, demo_adapter, tmp_path):
    from grpc_harness import LoopThread, start_full_server
    from loraplex.server.app import drain_and_stop
    from loraplex.server.config import load_server_config
    from loraplex.server.demo.walkthrough import DemoOptions, run_demo

    loop = LoopThread()
    config = load_server_config({"model": str(default_model_dir), "port": "0", "metrics_port": "0",
                                 "store": str(tmp_path / "store"), "max_total_tokens": "1024",
                                 "max_input_tokens": "512", "max_num_seqs": "4"}, {})
    running = loop.run(start_full_server(config))
    try:
        options = DemoOptions(address=f"127.0.0.1:{running.port}", start_server=False, adapter_dir=demo_adapter)
        lines: list[str] = []
        result = run_demo(options, log=lines.append)
        again = run_demo(options, log=lines.append)               # second run: adapter already there
    finally:
        loop.run(drain_and_stop(running, 1.0, log=lambda _m: None))
        loop.close()
    for exchange in result.exchanges + again.exchanges:
        assert exchange.with_adapter.startswith("ANSWER:"), exchange
        assert not exchange.without_adapter.startswith("ANSWER:"), exchange
    assert any("already on the server" in line for line in lines)
    assert any("with 'demo-answer-format'" in line for line in lines)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_demo_command_starts_a_server_when_none_answers(demo_adapter, tmp_path):
    env = dict(os.environ, LORAPLEX_ADDRESS="")
    command = [sys.executable, "-c", "import sys; from loraplex.cli import main; sys.exit(main())", "demo",
               "--address", f"127.0.0.1:{_free_port()}", "--adapter-dir", str(demo_adapter)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "starting `loraplex serve` on free ports" in done.stdout
    assert "with 'demo-answer-format':    ANSWER:" in done.stdout
    assert "stopped the server it started" in done.stdout


def test_demo_without_a_server_and_no_start_says_so(demo_adapter):
    command = [sys.executable, "-c", "import sys; from loraplex.cli import main; sys.exit(main())", "demo",
               "--address", f"127.0.0.1:{_free_port()}", "--adapter-dir", str(demo_adapter), "--no-start"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "no loraplex server answers at" in done.stderr
