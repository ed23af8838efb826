"""AdapterService: upload (client streaming), register, list, get, delete over the AdapterStore.

The rules (roles, tenants, name checks, non-blocking delete waits) live in the front door
(frontdoor/admin.py); store calls run on its store pool, off the event loop.
"""

from __future__ import annotations

import asyncio
import re

from ...v1 import adapters_pb2 as pb
from ...v1 import adapters_pb2_grpc
from ..engine.validation import ADAPTER_REF_RE
from ..frontdoor import admin
from ..frontdoor.access import Principal
from .errors import FieldViolation, invalid_argument, rpc_errors
from .state import ServiceState
from .store_convert import adapter_info, upload_metadata

MAX_CHUNK_BYTES = 2**20
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
FILE_NAMES = {pb.ADAPTER_FILE_CONFIG: "adapter_config.json", pb.ADAPTER_FILE_WEIGHTS: "adapter_model.safetensors",
              pb.ADAPTER_FILE_CHAT_TEMPLATE: "chat_template.jinja", pb.ADAPTER_FILE_TOKENIZER: "tokenizer.json",
              pb.ADAPTER_FILE_TOKENIZER_CONFIG: "tokenizer_config.json",
              pb.ADAPTER_FILE_SPECIAL_TOKENS_MAP: "special_tokens_map.json"}
TOKENIZER_FILES = (pb.ADAPTER_FILE_TOKENIZER, pb.ADAPTER_FILE_TOKENIZER_CONFIG, pb.ADAPTER_FILE_SPECIAL_TOKENS_MAP)


class AdapterServicer(adapters_pb2_grpc.AdapterServiceServicer):
    """A thin translator: proto <-> the front door's admin operations (frontdoor/admin.py)."""

    def __init__(self, state: ServiceState):
        self.state = state
        self.door = state.door

    def _principal(self, context) -> Principal:
        return self.state.keys.principal(context)

    @rpc_errors
    async def UploadAdapter(self, request_iterator, context) -> pb.UploadAdapterResponse:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("payload") != "metadata":
            raise invalid_argument([FieldViolation("metadata", "the first message must carry the upload metadata")])
        _check_metadata(first.metadata, self.state.config.max_adapter_bytes)
        session = await admin.begin_upload(self.door, self._principal(context),
                                           lambda tenant: upload_metadata(first.metadata, tenant))
        received = 0
        try:
            async for message in request_iterator:
                name, data = _chunk(message)
                received += len(data)
                await self.door.on_store(session.write, name, data)
            record = await self.door.on_store(session.commit)
        except BaseException:
            await asyncio.shield(self.door.on_store(session.abort))
            raise
        if self.state.metrics is not None:
            self.state.metrics.uploaded(received)
        return pb.UploadAdapterResponse(adapter=adapter_info(record))

    @rpc_errors
    async def RegisterAdapter(self, request: pb.RegisterAdapterRequest, context) -> pb.RegisterAdapterResponse:
        record = await admin.register(self.door, self._principal(context), request.adapter_id, request.path,
                                      private=request.private, allow_base_mismatch=request.allow_base_mismatch)
        return pb.RegisterAdapterResponse(adapter=adapter_info(record))

    @rpc_errors
    async def ListAdapters(self, request: pb.ListAdaptersRequest, context) -> pb.ListAdaptersResponse:
        records = await admin.list_adapters(self.door, self._principal(context))
        return pb.ListAdaptersResponse(adapters=[adapter_info(record) for record in records])

    @rpc_errors
    async def GetAdapter(self, request: pb.GetAdapterRequest, context) -> pb.GetAdapterResponse:
        record, versions = await admin.get_adapter(self.door, self._principal(context), request.adapter_id)
        return pb.GetAdapterResponse(adapter=adapter_info(record), versions=list(versions))

    @rpc_errors
    async def DeleteAdapter(self, request: pb.DeleteAdapterRequest, context) -> pb.DeleteAdapterResponse:
        deleted = await admin.delete(self.door, self._principal(context), request.adapter_id)
        return pb.DeleteAdapterResponse(deleted_versions=deleted)


def _name_problems(ref: str, field: str, allow_version: bool) -> list[FieldViolation]:
    if ADAPTER_REF_RE.fullmatch(ref) and (allow_version or "@" not in ref):
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
        if not _SHA256_RE.fullmatch(digest):
            problems.append(FieldViolation(f"metadata.{name}_sha256", "must be 64 lowercase hex digits"))
    for i, declared in enumerate(meta.tokenizer_files):
        where = f"metadata.tokenizer_files[{i}]"
        if declared.file not in TOKENIZER_FILES:
            problems.append(FieldViolation(f"{where}.file", "must be ADAPTER_FILE_TOKENIZER, "
                                           "ADAPTER_FILE_TOKENIZER_CONFIG or ADAPTER_FILE_SPECIAL_TOKENS_MAP"))
        if declared.size == 0:
            problems.append(FieldViolation(f"{where}.size", "must be > 0"))
        if not _SHA256_RE.fullmatch(declared.sha256):
            problems.append(FieldViolation(f"{where}.sha256", "must be 64 lowercase hex digits"))
    if meta.config_size + meta.weights_size > max_adapter_bytes:
        problems.append(FieldViolation("metadata.weights_size",
                                       f"the adapter is larger than the limit of {max_adapter_bytes} bytes"))
    _raise_on(problems)


def _chunk(message: pb.UploadAdapterRequest) -> tuple[str, bytes]:
    if message.WhichOneof("payload") != "chunk":
        raise invalid_argument([FieldViolation("chunk", "every message after the first must be a chunk")])
    chunk = message.chunk
    if chunk.file not in FILE_NAMES:
        raise invalid_argument([FieldViolation("chunk.file", "must be ADAPTER_FILE_CONFIG, ADAPTER_FILE_WEIGHTS, "
                                                              "ADAPTER_FILE_CHAT_TEMPLATE or a declared "
                                                              "ADAPTER_FILE_TOKENIZER* file")])
    if len(chunk.data) > MAX_CHUNK_BYTES:
        raise invalid_argument([FieldViolation("chunk.data", f"chunks must be at most {MAX_CHUNK_BYTES} bytes")])
    return FILE_NAMES[chunk.file], chunk.data
