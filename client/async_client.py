"""AsyncClient: the asyncio SDK, same methods as Client, awaitable (streams are async iterators)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterable, Iterator, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc, server_pb2, server_pb2_grpc
from . import _convert as convert
from ._channel import ChannelSettings, open_aio_channel
from ._retry import NO_RETRY, Attempts, RetryPolicy
from .errors import from_rpc_error
from .types import (AdapterInfo, ChatMessage, Generation, GenerationChunk, HealthStatus, ProgressCallback,
                    Sampling, ServerInfo)
from .upload import combine, progress_bar, upload_requests, validate_adapter_dir

if TYPE_CHECKING:                   # typing.Unpack needs Python 3.11; annotations are not evaluated
    from typing_extensions import Unpack

T = TypeVar("T")


class _Stubs:
    """The stubs over one grpc.aio channel (opened in the running event loop)."""

    def __init__(self, settings: ChannelSettings):
        self.channel = open_aio_channel(settings)
        self.generation = generation_pb2_grpc.GenerationServiceStub(self.channel)
        self.adapters = adapters_pb2_grpc.AdapterServiceStub(self.channel)
        self.server = server_pb2_grpc.ServerServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)


async def _in_thread(items: Iterator[T]) -> AsyncIterator[T]:
    """Drive a blocking iterator (file reads) from worker threads."""
    done = object()
    while (item := await asyncio.to_thread(next, items, done)) is not done:
        yield item


class AsyncClient:
    """Asyncio client for a loraplex server; arguments as for `Client`.

    Use `async with AsyncClient(...) as client:` or call `await client.close()`. The channel is
    opened on first use, inside the running event loop.
    """

    def __init__(self, address: str | None = None, api_key: str | None = None, *, tls: bool = False,
                 root_certificates: bytes | str | Path | None = None, tls_server_name: str | None = None,
                 timeout: float | None = 300.0, retry: RetryPolicy | None = None):
        self.settings = ChannelSettings.resolve(address, api_key, tls, root_certificates, tls_server_name,
                                                timeout, retry)
        self._open: _Stubs | None = None
        self._rng = random.Random()

    @property
    def address(self) -> str:
        return self.settings.address

    @property
    def _stubs(self) -> _Stubs:
        if self._open is None:
            self._open = _Stubs(self.settings)
        return self._open

    async def close(self) -> None:
        if self._open is not None:
            await self._open.channel.close()
            self._open = None

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *_exc) -> None:
        await self.close()

    # ---- generation ----------------------------------------------------------------------------
    async def generate(self, prompt: str, adapter_id: str | None = None, *, timeout: float | None = None,
                       **sampling: Unpack[Sampling]) -> Generation:
        """See Client.generate."""
        request = generation_pb2.GenerateRequest(input=convert.generation_input(prompt, None, adapter_id, sampling))
        return await self._generate(request, adapter_id, timeout)

    def generate_stream(self, prompt: str, adapter_id: str | None = None, *, timeout: float | None = None,
                        **sampling: Unpack[Sampling]) -> AsyncIterator[GenerationChunk]:
        """See Client.generate_stream; use `async for chunk in client.generate_stream(...)`."""
        message = convert.generation_input(prompt, None, adapter_id, sampling)
        return self._stream(generation_pb2.GenerateStreamRequest(input=message), adapter_id, timeout)

    async def chat(self, messages: Iterable[ChatMessage], adapter_id: str | None = None, *,
                   timeout: float | None = None, tools: list | None = None, tool_choice: Any = None,
                   parallel_tool_calls: bool | None = None, chat_template_kwargs: dict | None = None,
                   **sampling: Unpack[Sampling]) -> Generation:
        """See Client.chat."""
        chat = dict(tools=tools, tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls,
                    chat_template_kwargs=chat_template_kwargs)
        request = generation_pb2.GenerateRequest(input=convert.generation_input(None, messages, adapter_id, sampling,
                                                                                chat))
        return await self._generate(request, adapter_id, timeout)

    def chat_stream(self, messages: Iterable[ChatMessage], adapter_id: str | None = None, *,
                    timeout: float | None = None, tools: list | None = None, tool_choice: Any = None,
                    parallel_tool_calls: bool | None = None, chat_template_kwargs: dict | None = None,
                    **sampling: Unpack[Sampling]) -> AsyncIterator[GenerationChunk]:
        """See Client.chat_stream."""
        chat = dict(tools=tools, tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls,
                    chat_template_kwargs=chat_template_kwargs)
        message = convert.generation_input(None, messages, adapter_id, sampling, chat)
        return self._stream(generation_pb2.GenerateStreamRequest(input=message), adapter_id, timeout)

    # ---- adapters ------------------------------------------------------------------------------
    async def upload_adapter(self, path: str | Path, adapter_id: str, *, private: bool = False,
                             allow_base_mismatch: bool = False, progress: ProgressCallback | None = None,
                             show_progress: bool = False, timeout: float | None = None) -> AdapterInfo:
        """See Client.upload_adapter (validation and hashing run in a worker thread)."""
        adapter = await asyncio.to_thread(validate_adapter_dir, path)
        bar, close_bar = progress_bar(adapter.total_bytes, adapter_id) if show_progress else (None, None)
        requests = upload_requests(adapter, adapter_id, private, allow_base_mismatch, combine(progress, bar))
        try:
            response = await self._call(self._stubs.adapters.UploadAdapter, _in_thread(requests), timeout,
                                        retry=False)
        finally:
            if close_bar is not None:
                close_bar()
        return convert.adapter_info(response.adapter)

    async def register_adapter(self, adapter_id: str, path: str, *, private: bool = False,
                               allow_base_mismatch: bool = False, timeout: float | None = None) -> AdapterInfo:
        """See Client.register_adapter."""
        request = adapters_pb2.RegisterAdapterRequest(adapter_id=adapter_id, path=str(path), private=private,
                                                      allow_base_mismatch=allow_base_mismatch)
        response = await self._call(self._stubs.adapters.RegisterAdapter, request, timeout, retry=False)
        return convert.adapter_info(response.adapter)

    async def list_adapters(self, *, timeout: float | None = None) -> list[AdapterInfo]:
        response = await self._call(self._stubs.adapters.ListAdapters, adapters_pb2.ListAdaptersRequest(), timeout)
        return [convert.adapter_info(adapter) for adapter in response.adapters]

    async def get_adapter(self, adapter_id: str, *, timeout: float | None = None) -> AdapterInfo:
        request = adapters_pb2.GetAdapterRequest(adapter_id=adapter_id)
        response = await self._call(self._stubs.adapters.GetAdapter, request, timeout)
        return convert.adapter_info(response.adapter, response.versions)

    async def delete_adapter(self, adapter_id: str, *, timeout: float | None = None) -> list[int]:
        request = adapters_pb2.DeleteAdapterRequest(adapter_id=adapter_id)
        response = await self._call(self._stubs.adapters.DeleteAdapter, request, timeout, retry=False)
        return list(response.deleted_versions)

    # ---- server --------------------------------------------------------------------------------
    async def health(self, *, timeout: float | None = None) -> HealthStatus:
        response = await self._call(self._stubs.health.Check, health_pb2.HealthCheckRequest(), timeout)
        return convert.health_status(response)

    async def info(self, *, timeout: float | None = None) -> ServerInfo:
        return convert.server_info(await self._call(self._stubs.server.Info, server_pb2.InfoRequest(), timeout))

    # ---- plumbing ------------------------------------------------------------------------------
    def _attempts(self, timeout: float | None, retry: bool) -> Attempts:
        policy = self.settings.retry if retry else NO_RETRY
        return Attempts(policy, self.settings.call_timeout(timeout), self._rng)

    async def _generate(self, request: generation_pb2.GenerateRequest, adapter_id: str | None,
                        timeout: float | None) -> Generation:
        method = self._stubs.generation.Generate

        async def with_trailers(message, **kwargs):
            call = method(message, **kwargs)
            return await call, await call.trailing_metadata()

        response, trailers = await self._call(with_trailers, request, timeout, adapter_id=adapter_id)
        return convert.generation(response, trailers)

    async def _call(self, method: Callable[..., Any], request: Any, timeout: float | None,
                    retry: bool = True, adapter_id: str | None = None) -> Any:
        attempts = self._attempts(timeout, retry)
        while True:
            attempts.made += 1
            try:
                return await method(request, timeout=attempts.remaining_s(),
                                    metadata=self.settings.metadata(adapter_id))
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error, self.settings.address)
            delay = attempts.next_delay_s(error)
            if delay is None:
                raise error
            await asyncio.sleep(delay)

    async def _stream(self, request: generation_pb2.GenerateStreamRequest, adapter_id: str | None,
                      timeout: float | None) -> AsyncIterator[GenerationChunk]:
        attempts = self._attempts(timeout, retry=True)
        while True:
            attempts.made += 1
            call = self._stubs.generation.GenerateStream(request, timeout=attempts.remaining_s(),
                                                         metadata=self.settings.metadata(adapter_id))
            received = False
            try:
                async for response in call:
                    received = True
                    yield convert.generation_chunk(response)
                return
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error, self.settings.address)
            finally:
                call.cancel()
            delay = None if received else attempts.next_delay_s(error)
            if delay is None:
                raise error
            await asyncio.sleep(delay)
