"""The loraplex.v1 RPCs the fleet forwards: request type, streaming shape, servicer, routing."""

from __future__ import annotations

from dataclasses import dataclass

from ...v1 import adapters_pb2, generation_pb2, server_pb2


@dataclass(frozen=True)
class Method:
    service: str                 # "loraplex.v1.GenerationService"
    name: str                    # "Generate"
    servicer: str                # which replica servicer: "generation" | "adapters" | "server"
    request: type                # the request message class
    client_stream: bool = False
    server_stream: bool = False
    generation: bool = False     # counted by the front end's admission; routed by adapter

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"


_GEN, _ADA, _SRV = "loraplex.v1.GenerationService", "loraplex.v1.AdapterService", "loraplex.v1.ServerService"
METHODS: dict[str, Method] = {m.path: m for m in (
    Method(_GEN, "Generate", "generation", generation_pb2.GenerateRequest, generation=True),
    Method(_GEN, "GenerateStream", "generation", generation_pb2.GenerateStreamRequest, server_stream=True,
           generation=True),
    Method(_ADA, "UploadAdapter", "adapters", adapters_pb2.UploadAdapterRequest, client_stream=True),
    Method(_ADA, "RegisterAdapter", "adapters", adapters_pb2.RegisterAdapterRequest),
    Method(_ADA, "ListAdapters", "adapters", adapters_pb2.ListAdaptersRequest),
    Method(_ADA, "GetAdapter", "adapters", adapters_pb2.GetAdapterRequest),
    Method(_ADA, "DeleteAdapter", "adapters", adapters_pb2.DeleteAdapterRequest),
    Method(_SRV, "Info", "server", server_pb2.InfoRequest),
    Method(_SRV, "ResetPrefixCache", "server", server_pb2.ResetPrefixCacheRequest),   # one replica's cache
)}


def adapter_of(method: Method, request) -> str:
    """The adapter a parsed generation request names ("" for the base model or other calls)."""
    return request.input.adapter_id if method.generation else ""
