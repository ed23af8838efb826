"""Every SDK method, sync and async, against the REAL loraplex server (tiny random Llama, tmp store)
on a loopback port; plus auth with inference and admin keys."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from grpc_harness import LoopThread, make_peft_adapter, start_full_server
from loraplex.client import (AdapterNotFoundError, AsyncClient, AuthenticationError, Client, DeadlineExceededError,
                             FinishReason, HealthStatus, PermissionDeniedError, ValidationError)
from loraplex.server.app import drain_and_stop
from loraplex.server.config import load_server_config

ADMIN_KEY, USER_KEY = "admin-key-123", "acme:user-key-456"


def _start(tiny_llama_dir, store, environ=None, **extra):
    loop = LoopThread()
    values = {"model": str(tiny_llama_dir), "port": "0", "metrics_port": "0", "store": str(store),
              "kv_cache_memory": "16MiB", "max_total_tokens": "1024", "max_input_tokens": "512",
              "max_new_tokens": "1000", "max_loras": "2", **extra}
    running = loop.run(start_full_server(load_server_config(values, environ or {})))
    return loop, running


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama_dir, tmp_path_factory):
    return make_peft_adapter(tiny_llama_dir, tmp_path_factory.mktemp("tone"), seed=3)


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory, adapter_dir):
    roots = tmp_path_factory.mktemp("register-root")
    shutil.copytree(adapter_dir, roots / "legal")
    loop, running = _start(tiny_llama_dir, tmp_path_factory.mktemp("store"), allowed_register_roots=str(roots))
    yield f"127.0.0.1:{running.port}", roots / "legal"
    loop.run(drain_and_stop(running, 1.0, log=lambda _m: None))
    loop.close()


def test_sync_client_every_method(server, adapter_dir):
    address, register_path = server
    sent: list[int] = []
    with Client(address, timeout=120) as client:
        assert client.health() is HealthStatus.SERVING
        info = client.info()
        assert info.architecture == "LlamaForCausalLM" and info.limits.max_loras == 2 and not info.auth_enabled

        uploaded = client.upload_adapter(adapter_dir, "tone", progress=lambda done, total: sent.append(done))
        assert uploaded.ref == "tone@1" and uploaded.rank == 4 and sent[-1] > 0
        registered = client.register_adapter("legal", str(register_path))
        assert registered.adapter_id == "legal" and registered.version == 1
        assert {a.adapter_id for a in client.list_adapters()} == {"tone", "legal"}
        shown = client.get_adapter("tone")
        assert shown.versions == [1] and shown.sha256 == uploaded.sha256 and "q_proj" in shown.target_modules

        base = client.generate("The quick brown fox", max_new_tokens=6, ignore_eos=True)
        tuned = client.generate("The quick brown fox", "tone", max_new_tokens=6, ignore_eos=True, logprobs=True)
        assert base.finish_reason is FinishReason.LENGTH and len(base.token_ids) == 6 and base.adapter_id is None
        assert tuned.adapter_id == "tone@1" and len(tuned.logprobs) == 6 and tuned.usage.generated_tokens == 6
        chunks = list(client.generate_stream("The quick brown fox", "tone", max_new_tokens=6, ignore_eos=True))
        assert [t for c in chunks for t in c.token_ids] == tuned.token_ids
        assert "".join(c.text for c in chunks) == tuned.text and chunks[-1].usage.generated_tokens == 6
        assert all(c.finish_reason is None for c in chunks[:-1]) and chunks[-1].finish_reason is FinishReason.LENGTH

        chat = client.chat([{"role": "user", "content": "Hi"}], max_new_tokens=4, ignore_eos=True)
        streamed = list(client.chat_stream([("user", "Hi")], max_new_tokens=4, ignore_eos=True))
        assert [t for c in streamed for t in c.token_ids] == chat.token_ids and chat.usage.prompt_tokens > 2

        assert client.delete_adapter("legal") == [1]
        with pytest.raises(AdapterNotFoundError):
            client.get_adapter("legal")


def test_sync_client_errors(server):
    address, _ = server
    with Client(address) as client:
        with pytest.raises(ValidationError) as raised:
            client.generate("hi", top_p=2.0)
        assert any("top_p" in field for field in raised.value.violations)
        with pytest.raises(AdapterNotFoundError):
            client.generate("hi", "no-such-adapter", max_new_tokens=2)
        with pytest.raises(DeadlineExceededError):
            client.generate("Count:", max_new_tokens=900, ignore_eos=True, timeout=0.05)
        seeded = [client.generate("Once", max_new_tokens=5, temperature=1.0, seed=11).token_ids for _ in range(2)]
        assert seeded[0] == seeded[1]


def test_async_client_every_method(server, adapter_dir):
    address, register_path = server

    async def scenario():
        async with AsyncClient(address, timeout=120) as client:
            assert await client.health() is HealthStatus.SERVING
            assert (await client.info()).architecture == "LlamaForCausalLM"
            uploaded = await client.upload_adapter(adapter_dir, "async-tone")
            registered = await client.register_adapter("async-legal", str(register_path))
            listed = {a.adapter_id for a in await client.list_adapters()}
            shown = await client.get_adapter("async-tone@1")
            unary = await client.generate("Hello there", "async-tone", max_new_tokens=5, ignore_eos=True)
            chunks = [c async for c in client.generate_stream("Hello there", "async-tone", max_new_tokens=5,
                                                              ignore_eos=True)]
            chat = await client.chat([("user", "Hi")], max_new_tokens=3, ignore_eos=True)
            chat_chunks = [c async for c in client.chat_stream([("user", "Hi")], max_new_tokens=3, ignore_eos=True)]
            deleted = await client.delete_adapter("async-legal")
            with pytest.raises(AdapterNotFoundError):
                await client.get_adapter("async-legal")
            with pytest.raises(DeadlineExceededError):
                await client.generate("Count:", max_new_tokens=900, ignore_eos=True, timeout=0.05)
            return uploaded, registered, listed, shown, unary, chunks, chat, chat_chunks, deleted

    uploaded, registered, listed, shown, unary, chunks, chat, chat_chunks, deleted = asyncio.run(scenario())
    assert uploaded.ref == "async-tone@1" and registered.ref == "async-legal@1"
    assert {"async-tone", "async-legal"} <= listed and shown.version == 1
    assert [t for c in chunks for t in c.token_ids] == unary.token_ids and unary.adapter_id == "async-tone@1"
    assert [t for c in chat_chunks for t in c.token_ids] == chat.token_ids and deleted == [1]


def test_stream_closed_early_cancels_on_the_server(server):
    address, _ = server
    with Client(address) as client:
        stream = client.generate_stream("Count:", max_new_tokens=900, ignore_eos=True)
        first = next(stream)
        stream.close()
        assert first.finish_reason is None
        # the engine freed the request: a follow-up request still runs promptly
        assert len(client.generate("Hi", max_new_tokens=2, ignore_eos=True, timeout=60).token_ids) == 2


@pytest.fixture(scope="module")
def auth_server(tiny_llama_dir, tmp_path_factory):
    environ = {"LORAPLEX_API_KEYS": USER_KEY, "LORAPLEX_ADMIN_KEYS": f"acme:{ADMIN_KEY}"}
    loop, running = _start(tiny_llama_dir, tmp_path_factory.mktemp("auth-store"), environ)
    yield f"127.0.0.1:{running.port}"
    loop.run(drain_and_stop(running, 1.0, log=lambda _m: None))
    loop.close()


def test_auth_keys_and_roles(auth_server, adapter_dir):
    user_key = USER_KEY.split(":", 1)[1]
    with Client(auth_server) as anonymous:
        assert anonymous.health() is HealthStatus.SERVING          # health stays open
        with pytest.raises(AuthenticationError, match="API key"):
            anonymous.generate("hi", max_new_tokens=2)
    with Client(auth_server, api_key="wrong-key") as wrong, pytest.raises(AuthenticationError):
        wrong.list_adapters()
    with Client(auth_server, api_key=user_key) as user:
        assert user.generate("hi", max_new_tokens=2, ignore_eos=True).usage.generated_tokens == 2
        with pytest.raises(PermissionDeniedError, match="admin"):
            user.upload_adapter(adapter_dir, "denied")
    with Client(auth_server, api_key=ADMIN_KEY) as admin:
        assert admin.upload_adapter(adapter_dir, "private-tone", private=True).owner == "acme"

    async def async_user():
        async with AsyncClient(auth_server, api_key=user_key) as client:
            return [a.adapter_id for a in await client.list_adapters()]
    assert asyncio.run(async_user()) == ["private-tone"]            # same tenant sees its private adapter
