"""AdapterService: upload (client streaming), register, list, get, delete over the AdapterStore.

Store calls do disk I/O and hashing, so they run in worker threads off the event loop.
"""

from __future__ import annotations

import asyncio
import re

import grpc

from ...v1 import adapters_pb2 as pb
from ...v1 import adapters_pb2_grpc
from ..engine.validation import ADAPTER_REF_RE
from .errors import FieldViolation, ServiceError, invalid_argument, rpc_errors
from .state import ServiceState
from .store_convert import adapter_info, upload_metadata

MAX_CHUNK_BYTES = 2**20
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
FILE_NAMES = {pb.ADAPTER_FILE_CONFIG: "adapter_config.json", pb.ADAPTER_FILE_WEIGHTS: "adapter_model.safetensors"}


class AdapterServicer(adapters_pb2_grpc.AdapterServiceServicer):
    def __init__(self, state: ServiceState):
        self.state = state

    def _tenant(self, context) -> str | None:
        return self.state.keys.principal(context).tenant

    @rpc_errors
    async def UploadAdapter(self, request_iterator, context) -> pb.UploadAdapterResponse:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("payload") != "metadata":
            raise invalid_argument([FieldViolation("metadata", "the first message must carry the upload metadata")])
        _check_metadata(first.metadata, self.state.config.max_adapter_bytes)
        meta = upload_metadata(first.metadata, self._tenant(context))
        store = self._writable_store()
        session = await asyncio.to_thread(store.begin_upload, meta)
        received = 0
        try:
            async for message in request_iterator:
                name, data = _chunk(message)
                received += len(data)
                await asyncio.to_thread(session.write, name, data)
            record = await asyncio.to_thread(session.commit)
        except BaseException:
            await asyncio.shield(asyncio.to_thread(session.abort))
            raise
        if self.state.metrics is not None:
            self.state.metrics.uploaded(received)
        return pb.UploadAdapterResponse(adapter=adapter_info(record))

    @rpc_errors
    async def RegisterAdapter(self, request: pb.RegisterAdapterRequest, context) -> pb.RegisterAdapterResponse:
        store = self._writable_store()
        problems = _name_problems(request.adapter_id, "adapter_id", allow_version=False)
        if not request.path:
            problems.append(FieldViolation("path", "must name a directory under an allowed register root"))
        if problems:
            raise invalid_argument(problems)
        record = await asyncio.to_thread(
            store.register_path, request.adapter_id, request.path, owner=self._owner(request.private, context),
            allow_base_mismatch=request.allow_base_mismatch)
        return pb.RegisterAdapterResponse(adapter=adapter_info(record))

    @rpc_errors
    async def ListAdapters(self, request: pb.ListAdaptersRequest, context) -> pb.ListAdaptersResponse:
        records = await asyncio.to_thread(self.state.require_store().list, self._tenant(context))
        return pb.ListAdaptersResponse(adapters=[adapter_info(record) for record in records])

    @rpc_errors
    async def GetAdapter(self, request: pb.GetAdapterRequest, context) -> pb.GetAdapterResponse:
        _raise_on(_name_problems(request.adapter_id, "adapter_id", allow_version=True))
        record, versions = await asyncio.to_thread(self.state.require_store().get, request.adapter_id,
                                                   self._tenant(context))
        return pb.GetAdapterResponse(adapter=adapter_info(record), versions=list(versions))

    @rpc_errors
    async def DeleteAdapter(self, request: pb.DeleteAdapterRequest, context) -> pb.DeleteAdapterResponse:
        store = self._writable_store()
        _raise_on(_name_problems(request.adapter_id, "adapter_id", allow_version=True))
        deleted = await asyncio.to_thread(store.delete, request.adapter_id, self._tenant(context))
        name = request.adapter_id.split("@", 1)[0]
        if self.state.engine is not None:   # in-flight requests are done: drop the device slots too
            await self.state.engine.evict_adapters([f"{name}@{v}" for v in deleted])
        return pb.DeleteAdapterResponse(deleted_versions=list(deleted))

    def _writable_store(self):
        if self.state.draining:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        return self.state.require_store()

    def _owner(self, private: bool, context) -> str | None:
        tenant = self._tenant(context)
        if private and tenant is None:
            raise invalid_argument([FieldViolation("private", "private adapters need a key with a tenant "
                                                              "('tenant:key')")])
        return tenant if private else None


def _name_problems(ref: str, field: str, allow_version: bool) -> list[FieldViolation]:
    if ADAPTER_REF_RE.match(ref) and (allow_version or "@" not in ref):
        return []
    form = "'name' or 'name@version'" if allow_version else "'name'"
    return [FieldViolation(field, f"must be {form} with name matching [A-Za-z0-9][A-Za-z0-9._-]{{0,127}}")]


def _raise_on(problems: list[FieldViolation]) -> None:
    if problems:
        raise invalid_argument(problems)


def _check_metadata(meta: pb.UploadMetadata, max_adapter_bytes: int) -> None:
    problems = _name_problems(meta.adapter_id, "metadata.adapter_id", allow_version=False)
    for name in ("config", "weights"):
        size, digest = getattr(meta, f"{name}_size"), getattr(meta, f"{name}_sha256")
        if size == 0:
            problems.append(FieldViolation(f"metadata.{name}_size", "must be > 0"))
        if not _SHA256_RE.match(digest):
            problems.append(FieldViolation(f"metadata.{name}_sha256", "must be 64 lowercase hex digits"))
    if meta.config_size + meta.weights_size > max_adapter_bytes:
        problems.append(FieldViolation("metadata.weights_size",
                                       f"the adapter is larger than the limit of {max_adapter_bytes} bytes"))
    _raise_on(problems)


def _chunk(message: pb.UploadAdapterRequest) -> tuple[str, bytes]:
    if message.WhichOneof("payload") != "chunk":
        raise invalid_argument([FieldViolation("chunk", "every message after the first must be a chunk")])
    chunk = message.chunk
    if chunk.file not in FILE_NAMES:
        raise invalid_argument([FieldViolation("chunk.file", "must be ADAPTER_FILE_CONFIG or ADAPTER_FILE_WEIGHTS")])
    if len(chunk.data) > MAX_CHUNK_BYTES:
        raise invalid_argument([FieldViolation("chunk.data", f"chunks must be at most {MAX_CHUNK_BYTES} bytes")])
    return FILE_NAMES[chunk.file], chunk.data
