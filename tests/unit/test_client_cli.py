"""`loraplex generate|adapters|info|health` against a real scripted gRPC server: output and exit codes."""

from __future__ import annotations

import json

import grpc
import pytest

from client_harness import Fail, ScriptedServer
from loraplex.cli import main


@pytest.fixture
def server():
    running = ScriptedServer()
    yield running
    running.stop()


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_plain_json_and_stream(server, capsys):
    code, out, _ = run(capsys, "generate", "hi", "--address", server.address, "--max-new-tokens", "2",
                       "--stop", "x", "--stop", "y", "--adapter", "tone@1")
    assert code == 0 and out == " hello\n"
    sent = server.script.calls[0].request.input
    assert sent.adapter_id == "tone@1" and list(sent.sampling.stop) == ["x", "y"]
    assert sent.sampling.max_new_tokens == 2 and not sent.sampling.HasField("temperature")
    code, out, _ = run(capsys, "generate", "hi", "--address", server.address, "--json")
    assert code == 0 and json.loads(out)["token_ids"] == [5, 6]
    code, out, _ = run(capsys, "generate", "hi", "--address", server.address, "--stream", "--chat",
                       "--system", "be brief")
    assert code == 0 and out == " hello\n"
    roles = [m.role for m in server.script.calls_to("GenerateStream")[0].request.input.chat.messages]
    assert roles == ["system", "user"]


def test_adapters_commands(server, capsys, monkeypatch):
    monkeypatch.setenv("LORAPLEX_ADDRESS", server.address)
    monkeypatch.setenv("LORAPLEX_API_KEY", "env-key")
    code, out, _ = run(capsys, "adapters", "list")
    assert code == 0 and out.splitlines()[0].startswith("ID") and "tone" in out and "legal" in out
    code, out, _ = run(capsys, "adapters", "list", "--json")
    assert [a["adapter_id"] for a in json.loads(out)] == ["tone", "legal"]
    code, out, _ = run(capsys, "adapters", "show", "tone")
    assert code == 0 and "versions:" in out and "1, 2" in out
    code, out, _ = run(capsys, "adapters", "rm", "tone")
    assert code == 0 and out.strip() == "deleted tone versions 1, 2"
    assert all(call.metadata["authorization"] == "Bearer env-key" for call in server.script.calls)


@pytest.mark.parametrize("code, exit_code, hint", [
    (grpc.StatusCode.NOT_FOUND, 3, "loraplex adapters list"),
    (grpc.StatusCode.UNAUTHENTICATED, 4, "LORAPLEX_API_KEY"),
    (grpc.StatusCode.PERMISSION_DENIED, 4, "permission denied"),
    (grpc.StatusCode.INVALID_ARGUMENT, 2, "bad id"),
    (grpc.StatusCode.INTERNAL, 1, "bad id"),
])
def test_errors_become_exit_codes_and_messages(server, capsys, code, exit_code, hint):
    server.script.push("GetAdapter", Fail(code, "bad id"))
    status, _, err = run(capsys, "adapters", "show", "nope", "--address", server.address)
    assert status == exit_code and hint in err and err.startswith("loraplex: error:")


def test_unreachable_server_has_an_actionable_message(capsys):
    status, _, err = run(capsys, "health", "--address", "127.0.0.1:1", "--timeout", "5")
    assert status == 5 and "cannot reach loraplex at 127.0.0.1:1: is `make serve` running?" in err


def test_health_and_info(server, capsys):
    code, out, _ = run(capsys, "health", "--address", server.address)
    assert code == 0 and out.strip() == "SERVING"
    from grpc_health.v1 import health_pb2
    server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    code, out, _ = run(capsys, "health", "--address", server.address)
    assert code == 5 and out.strip() == "NOT_SERVING"
    code, out, _ = run(capsys, "info", "--address", server.address)
    assert code == 0 and "architecture:" in out and "LlamaForCausalLM" in out
    code, out, _ = run(capsys, "info", "--address", server.address, "--json")
    assert json.loads(out)["limits"]["max_loras"] == 2


def test_upload_validation_error_is_exit_2(tmp_path, capsys):
    status, _, err = run(capsys, "adapters", "upload", str(tmp_path), "--id", "x", "--address", "127.0.0.1:1")
    assert status == 2 and "adapter_config.json" in err



@pytest.mark.parametrize("argv", [("--timeout", "nan"), ("--timeout", "inf"), ("--timeout", "-1"),
                                  ("--temperature", "nan"), ("--top-p", "inf")])
def test_non_finite_numbers_are_usage_errors(server, capsys, argv):
    with pytest.raises(SystemExit) as exited:
        main(["generate", "hi", "--address", server.address, *argv])
    assert exited.value.code == 2 and argv[0] in capsys.readouterr().err


def test_system_without_chat_is_refused(server, capsys):
    code, _, err = run(capsys, "generate", "hi", "--address", server.address, "--system", "be terse")
    assert code == 2 and "--system needs --chat" in err
    assert not server.script.calls_to("Generate")
