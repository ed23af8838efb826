"""HTTP `/ready` follows the engine's liveness (`EngineClient.alive`), not only start-up and drain:
a server whose engine has stopped (a crashed step thread, or an engine-core process between its
death and its successor's Ready) must not tell a load balancer it is ready. `/health` stays the
process's liveness and answers 200 throughout (a restart must not get the pod killed)."""

from __future__ import annotations

from dataclasses import replace

import httpx

from grpc_harness import LoopThread, start_full_server
from loraplex.server.app import drain_and_stop, start_http_api
from loraplex.server.config import load_server_config


def test_ready_is_503_once_the_engine_is_not_alive(tiny_llama_dir, tmp_path):
    loop = LoopThread()
    config = load_server_config({
        "model": str(tiny_llama_dir), "port": "0", "metrics_port": "0", "store": str(tmp_path / "store"),
        "kv_cache_memory": "16MiB", "max_total_tokens": "1024", "max_input_tokens": "512"}, {})
    running = loop.run(start_full_server(replace(config, engine_process=False)))
    try:
        loop.run(start_http_api(running, config, port=0))
        base = f"http://127.0.0.1:{running.http_port}"
        assert httpx.get(f"{base}/ready", timeout=30).json() == {"status": "ready"}
        loop.run(running.state.engine.shutdown())            # the step thread is gone
        assert not running.state.engine.alive()
        reply = httpx.get(f"{base}/ready", timeout=30)
        assert reply.status_code == 503 and reply.json() == {"status": "engine unavailable"}
        assert reply.headers["retry-after"] == "1"
        assert httpx.get(f"{base}/health", timeout=30).status_code == 200
    finally:
        loop.run(drain_and_stop(running, 1.0, log=lambda _m: None))
        loop.close()
