"""The SDK sends a generation call's adapter id as Ray's routing key, and nothing else does."""

from __future__ import annotations

import asyncio

import pytest

from client_harness import ScriptedServer
from loraplex.client import AsyncClient, Client


@pytest.fixture
def server():
    scripted = ScriptedServer()
    yield scripted
    scripted.stop()


def _routing(server, method: str) -> list[str | None]:
    return [call.metadata.get("multiplexed_model_id") for call in server.script.calls_to(method)]


def test_sync_client_routes_generation_by_adapter(server):
    with Client(server.address, api_key="k") as client:
        client.generate("x", adapter_id="tone@2")
        client.generate("x")
        list(client.generate_stream("x", adapter_id="tone"))
        client.chat([("user", "hi")], adapter_id="chat")
        client.list_adapters()
    assert _routing(server, "Generate") == ["tone@2", None, "chat"]
    assert _routing(server, "GenerateStream") == ["tone"]
    assert _routing(server, "ListAdapters") == [None]
    assert all(call.metadata["authorization"] == "Bearer k" for call in server.script.calls)


def test_async_client_routes_generation_by_adapter(server):
    async def run():
        async with AsyncClient(server.address) as client:
            result = await client.generate("x", adapter_id="tone")
            [chunk async for chunk in client.generate_stream("x", adapter_id="tone")]
            return result

    result = asyncio.run(run())
    assert _routing(server, "Generate") == ["tone"] and _routing(server, "GenerateStream") == ["tone"]
    assert result.replica is None                 # this scripted server sends no loraplex-replica trailer
