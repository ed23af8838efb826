"""`loraplex bench` against the REAL server (tiny random Llama, tmp store) on a loopback port."""

from __future__ import annotations

import json

import pytest

from grpc_harness import LoopThread, make_peft_adapter, start_full_server
from loraplex.cli import main
from loraplex.client import Client
from loraplex.server.app import drain_and_stop
from loraplex.server.config import load_server_config


@pytest.fixture(scope="module")
def address(tiny_llama_dir, tmp_path_factory):
    loop = LoopThread()
    values = {"model": str(tiny_llama_dir), "port": "0", "metrics_port": "0",
              "store": str(tmp_path_factory.mktemp("store")), "kv_cache_memory": "16MiB",
              "max_total_tokens": "1024", "max_input_tokens": "512", "max_new_tokens": "64", "max_loras": "2"}
    running = loop.run(start_full_server(load_server_config(values, {})))
    address = f"127.0.0.1:{running.port}"
    with Client(address, timeout=120) as client:
        for i in range(3):
            client.upload_adapter(make_peft_adapter(tiny_llama_dir, tmp_path_factory.mktemp(f"a{i}"), seed=i),
                                  f"bench-{i:04d}")
    yield address
    loop.run(drain_and_stop(running, 1.0, log=lambda _m: None))
    loop.close()


def test_closed_loop_zipf_adapters_json_and_plot(address, tmp_path, capsys):
    result_file, plots = tmp_path / "result.json", tmp_path / "plots"
    code = main(["bench", "--address", address, "--num-prompts", "10", "--concurrency", "2,4",
                 "--num-adapters", "3", "--popularity", "zipf", "--input-len", "8:16", "--output-len", "6",
                 "--warmup", "2", "--slo-ttft", "60000", "--slo-tpot", "60000", "--json", str(result_file),
                 "--plot-dir", str(plots), "--label", "suite=test", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "Output token throughput (tok/s)" in printed and "TPOT" in printed
    runs = json.loads(result_file.read_text())["runs"]
    assert [run["config"]["concurrency"] for run in runs] == [2, 4]
    for run in runs:
        stats = run["stats"]
        assert stats["completed"] == 10 and stats["failed"] == 0 and stats["errors"] == {}
        assert stats["output_tokens"] == 60 and 80 <= stats["prompt_tokens"] <= 10 * 40
        assert stats["goodput"] == pytest.approx(stats["request_throughput"])     # generous SLOs: all good
        assert 0 < stats["ttft"]["p50_ms"] <= stats["ttft"]["p99_ms"] <= stats["e2e"]["max_ms"]
        assert stats["tpot"]["count"] == 10 and stats["itl"]["count"] > 0
        assert run["config"]["labels"] == {"suite": "test"} and len(run["config"]["adapters"]) == 3
    assert (plots / "bench_vs_concurrency.png").stat().st_size > 1000


def test_open_loop_counts_errors_by_status(address, tmp_path, capsys):
    result_file = tmp_path / "errors.json"
    code = main(["bench", "--address", address, "--num-prompts", "4", "--request-rate", "50",
                 "--adapters", "no-such-adapter", "--output-len", "4", "--input-len", "8", "--warmup", "0",
                 "--json", str(result_file), "--no-progress"])
    assert code == 1
    stats = json.loads(result_file.read_text())["runs"][0]["stats"]
    assert stats["completed"] == 0 and stats["errors"] == {"NOT_FOUND": 4}
    assert "Errors NOT_FOUND" in capsys.readouterr().out


def test_unreachable_server_and_bad_options_exit_codes(capsys):
    assert main(["bench", "--address", "127.0.0.1:1", "--num-prompts", "1", "--timeout", "2",
                 "--no-progress"]) == 5
    assert "cannot reach loraplex" in capsys.readouterr().err
    assert main(["bench", "--concurrency", "2", "--request-rate", "1"]) == 2
    assert "not both" in capsys.readouterr().err


@pytest.mark.parametrize("workload", ["shared-prefix", "multi-turn"])
def test_chat_workloads_report_prefix_cache_hits(address, tmp_path, capsys, workload):
    """shared-prefix: each adapter's system prompt + fresh questions; multi-turn: conversations
    resending their history. Both must find most of their prompt tokens in the server's cache."""
    result_file = tmp_path / "result.json"
    code = main(["bench", "--address", address, "--workload", workload, "--prefix-len", "96", "--turns", "3",
                 "--num-prompts", "9", "--concurrency", "3", "--num-adapters", "3", "--input-len", "8",
                 "--output-len", "6", "--warmup", "0", "--json", str(result_file), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert f"{workload} (system prompt 96 tokens" in printed and "Input tokens from prefix cache" in printed
    (run,) = json.loads(result_file.read_text())["runs"]
    stats = run["stats"]
    assert stats["completed"] == 9 and stats["output_tokens"] == 54
    assert stats["cached_prompt_tokens"] >= 0.4 * stats["prompt_tokens"], stats


def test_chat_workload_builders():
    from loraplex.client.bench.config import BenchConfig, LengthSpec
    from loraplex.client.bench.workload import build_requests, system_prompt

    fixed = LengthSpec("fixed", 8, 8)
    shared = build_requests(BenchConfig(num_prompts=6, concurrency=2, workload="shared-prefix", prefix_len=20,
                                        adapters=("a", "b"), input_len=fixed))
    assert [r.adapter_id for r in shared] == ["a", "b"] * 3
    for r in shared:
        assert r.prompt.startswith(system_prompt(r.adapter_id, 20)) and r.conversation is None
    assert len({r.prompt for r in shared}) == 6 and system_prompt("a", 20) != system_prompt("b", 20)
    chat = build_requests(BenchConfig(num_prompts=6, concurrency=2, workload="multi-turn", turns=3,
                                      prefix_len=20, adapters=("a", "b"), input_len=fixed))
    assert [(r.conversation, r.adapter_id) for r in chat] == [(0, "a")] * 3 + [(1, "b")] * 3
    assert chat[0].prompt.startswith("System: ") and not chat[1].prompt.startswith("System: ")
    with pytest.raises(ValueError, match="multi-turn needs --concurrency"):
        BenchConfig(num_prompts=6, request_rate=1.0, workload="multi-turn")
