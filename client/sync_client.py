"""Client: the blocking SDK. One gRPC channel per client, reused by every call."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc, server_pb2, server_pb2_grpc
from . import _convert as convert
from ._channel import ChannelSettings, open_sync_channel
from ._retry import NO_RETRY, Attempts, RetryPolicy
from .errors import from_rpc_error
from .types import (AdapterInfo, ChatMessage, Generation, GenerationChunk, HealthStatus, ProgressCallback,
                    Sampling, ServerInfo)
from .upload import combine, progress_bar, upload_requests, validate_adapter_dir

if TYPE_CHECKING:                   # typing.Unpack needs Python 3.11; annotations are not evaluated
    from typing_extensions import Unpack


class Client:
    """Blocking client for a loraplex server.

    `address` and `api_key` default to $LORAPLEX_ADDRESS / $LORAPLEX_API_KEY, then to
    127.0.0.1:50051 and no key. `timeout` is the default deadline of each call in seconds
    (None = none); every method takes its own `timeout=` too. `retry` controls retries of
    UNAVAILABLE / RESOURCE_EXHAUSTED (reads and generation only; writes are never retried).
    TLS: `tls=True` uses the system roots; `root_certificates` (PEM bytes or a file path) pins
    a CA; `tls_server_name` overrides the name checked in the server's certificate.
    """

    def __init__(self, address: str | None = None, api_key: str | None = None, *, tls: bool = False,
                 root_certificates: bytes | str | Path | None = None, tls_server_name: str | None = None,
                 timeout: float | None = 300.0, retry: RetryPolicy | None = None):
        self.settings = ChannelSettings.resolve(address, api_key, tls, root_certificates, tls_server_name,
                                                timeout, retry)
        self._channel = open_sync_channel(self.settings)
        self._generation = generation_pb2_grpc.GenerationServiceStub(self._channel)
        self._adapters = adapters_pb2_grpc.AdapterServiceStub(self._channel)
        self._server = server_pb2_grpc.ServerServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._rng = random.Random()

    @property
    def address(self) -> str:
        return self.settings.address

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.settings.address!r}, tls={self.settings.tls}, key={'set' if self.settings.api_key else 'none'})"

    # ---- generation ----------------------------------------------------------------------------
    def generate(self, prompt: str, adapter_id: str | None = None, *, timeout: float | None = None,
                 **sampling: Unpack[Sampling]) -> Generation:
        """Generate a completion of the raw `prompt` (no chat template), optionally with a LoRA.

        Sampling keywords: max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed,
        stop, stop_token_ids, ignore_eos, logprobs, top_logprobs, presence_penalty,
        frequency_penalty, min_tokens, skip_special_tokens, and at most one structured-output constraint:
        json_schema, json_object, regex, choice, grammar (see `loraplex.client.Sampling`).
        """
        request = generation_pb2.GenerateRequest(input=convert.generation_input(prompt, None, adapter_id, sampling))
        return self._generate(request, adapter_id, timeout)

    def generate_stream(self, prompt: str, adapter_id: str | None = None, *, timeout: float | None = None,
                        **sampling: Unpack[Sampling]) -> Iterator[GenerationChunk]:
        """Like generate, but yields text deltas as they are produced; the last chunk has
        finish_reason, usage and timing. Closing the iterator early cancels the request."""
        message = convert.generation_input(prompt, None, adapter_id, sampling)
        return self._stream(generation_pb2.GenerateStreamRequest(input=message), adapter_id, timeout)

    def chat(self, messages: Iterable[ChatMessage], adapter_id: str | None = None, *,
             timeout: float | None = None, tools: list | None = None, tool_choice: Any = None,
             parallel_tool_calls: bool | None = None, chat_template_kwargs: dict | None = None,
             **sampling: Unpack[Sampling]) -> Generation:
        """Generate the assistant's reply to chat `messages` ([{"role", "content"}] or (role, content)),
        rendered with the model's chat template."""
        chat = dict(tools=tools, tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls,
                    chat_template_kwargs=chat_template_kwargs)
        request = generation_pb2.GenerateRequest(input=convert.generation_input(None, messages, adapter_id, sampling,
                                                                                chat))
        return self._generate(request, adapter_id, timeout)

    def chat_stream(self, messages: Iterable[ChatMessage], adapter_id: str | None = None, *,
                    timeout: float | None = None, tools: list | None = None, tool_choice: Any = None,
                    parallel_tool_calls: bool | None = None, chat_template_kwargs: dict | None = None,
                    **sampling: Unpack[Sampling]) -> Iterator[GenerationChunk]:
        """Streaming `chat`."""
        chat = dict(tools=tools, tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls,
                    chat_template_kwargs=chat_template_kwargs)
        message = convert.generation_input(None, messages, adapter_id, sampling, chat)
        return self._stream(generation_pb2.GenerateStreamRequest(input=message), adapter_id, timeout)

    # ---- adapters ------------------------------------------------------------------------------
    def upload_adapter(self, path: str | Path, adapter_id: str, *, private: bool = False,
                       allow_base_mismatch: bool = False, progress: ProgressCallback | None = None,
                       show_progress: bool = False, timeout: float | None = None) -> AdapterInfo:
        """Upload a local PEFT LoRA directory (adapter_config.json + adapter_model.safetensors).

        The directory is validated locally first (ValidationError, nothing sent). `progress(sent,
        total)` is called after each chunk; `show_progress=True` draws a tqdm bar on stderr.
        """
        adapter = validate_adapter_dir(path)
        bar, close_bar = progress_bar(adapter.total_bytes, adapter_id) if show_progress else (None, None)
        requests = upload_requests(adapter, adapter_id, private, allow_base_mismatch, combine(progress, bar))
        try:
            response = self._call(self._adapters.UploadAdapter, requests, timeout, retry=False)
        finally:
            if close_bar is not None:
                close_bar()
        return convert.adapter_info(response.adapter)

    def register_adapter(self, adapter_id: str, path: str, *, private: bool = False,
                         allow_base_mismatch: bool = False, timeout: float | None = None) -> AdapterInfo:
        """Register a PEFT directory that already lies on the server (under an allowed root)."""
        request = adapters_pb2.RegisterAdapterRequest(adapter_id=adapter_id, path=str(path), private=private,
                                                      allow_base_mismatch=allow_base_mismatch)
        return convert.adapter_info(self._call(self._adapters.RegisterAdapter, request, timeout, retry=False).adapter)

    def list_adapters(self, *, timeout: float | None = None) -> list[AdapterInfo]:
        """The latest version of each adapter visible to this key."""
        response = self._call(self._adapters.ListAdapters, adapters_pb2.ListAdaptersRequest(), timeout)
        return [convert.adapter_info(adapter) for adapter in response.adapters]

    def get_adapter(self, adapter_id: str, *, timeout: float | None = None) -> AdapterInfo:
        """One adapter ("name" = latest version, "name@3" = pinned), with all its `versions`."""
        response = self._call(self._adapters.GetAdapter, adapters_pb2.GetAdapterRequest(adapter_id=adapter_id),
                              timeout)
        return convert.adapter_info(response.adapter, response.versions)

    def delete_adapter(self, adapter_id: str, *, timeout: float | None = None) -> list[int]:
        """Delete "name" (every version) or "name@3" (one); returns the deleted versions."""
        request = adapters_pb2.DeleteAdapterRequest(adapter_id=adapter_id)
        return list(self._call(self._adapters.DeleteAdapter, request, timeout, retry=False).deleted_versions)

    # ---- server --------------------------------------------------------------------------------
    def health(self, *, timeout: float | None = None) -> HealthStatus:
        """The server's grpc.health.v1 status (SERVING once the model is loaded)."""
        return convert.health_status(self._call(self._health.Check, health_pb2.HealthCheckRequest(), timeout))

    def info(self, *, timeout: float | None = None) -> ServerInfo:
        """Model, quantization, dtype, device, limits and base fingerprint of the server."""
        return convert.server_info(self._call(self._server.Info, server_pb2.InfoRequest(), timeout))

    # ---- plumbing ------------------------------------------------------------------------------
    def _attempts(self, timeout: float | None, retry: bool) -> Attempts:
        policy = self.settings.retry if retry else NO_RETRY
        return Attempts(policy, self.settings.call_timeout(timeout), self._rng)

    def _generate(self, request: generation_pb2.GenerateRequest, adapter_id: str | None,
                  timeout: float | None) -> Generation:
        response, call = self._call(self._generation.Generate.with_call, request, timeout, adapter_id=adapter_id)
        return convert.generation(response, call.trailing_metadata())

    def _call(self, method: Callable[..., Any], request: Any, timeout: float | None, retry: bool = True,
              adapter_id: str | None = None) -> Any:
        """One unary (or client-streaming) call with deadline, key metadata and retries."""
        attempts = self._attempts(timeout, retry)
        while True:
            attempts.made += 1
            try:
                return method(request, timeout=attempts.remaining_s(), metadata=self.settings.metadata(adapter_id))
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error, self.settings.address)
            delay = attempts.next_delay_s(error)
            if delay is None:
                raise error
            time.sleep(delay)

    def _stream(self, request: generation_pb2.GenerateStreamRequest, adapter_id: str | None,
                timeout: float | None) -> Iterator[GenerationChunk]:
        """Server-streaming call; retried only while no chunk has arrived yet."""
        attempts = self._attempts(timeout, retry=True)
        while True:
            attempts.made += 1
            call = self._generation.GenerateStream(request, timeout=attempts.remaining_s(),
                                                   metadata=self.settings.metadata(adapter_id))
            received = False
            try:
                for response in call:
                    received = True
                    yield convert.generation_chunk(response)
                return
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error, self.settings.address)
            finally:
                call.cancel()          # no-op once finished; frees the server's request on early close
            delay = None if received else attempts.next_delay_s(error)
            if delay is None:
                raise error
            time.sleep(delay)
