"""ServerService: Info (model, quantization, dtype, limits, base fingerprint, version) and the
admin ResetPrefixCache."""

from __future__ import annotations

from ... import __version__
from ...v1 import server_pb2 as pb
from ...v1 import server_pb2_grpc
from ..frontdoor import admin
from .errors import rpc_errors
from .state import ServiceState


class ServerServicer(server_pb2_grpc.ServerServiceServicer):
    def __init__(self, state: ServiceState):
        self.state = state

    @rpc_errors
    async def Info(self, request: pb.InfoRequest, context) -> pb.InfoResponse:
        info = self.state.require_engine().info
        config = self.state.config
        limits = pb.Limits(
            max_input_tokens=config.max_input_tokens, max_total_tokens=config.max_total_tokens,
            max_new_tokens=config.max_new_tokens, max_stop_sequences=config.max_stop_sequences,
            max_queued_requests=config.max_queued_requests, max_loras=config.max_loras,
            max_lora_rank=config.max_lora_rank, max_message_bytes=config.max_message_bytes,
            max_adapter_bytes=config.max_adapter_bytes)
        return pb.InfoResponse(
            version=__version__, model=config.model if config.model == "default" else info.model,
            architecture=info.architecture, quantization=info.quantization, dtype=info.dtype,
            base_fingerprint=info.base_fingerprint, limits=limits, auth_enabled=self.state.keys.enabled,
            device=info.device, linear_weight_bytes=info.linear_weight_bytes,
            linear_kernels=[choice.describe() for choice in info.linear_kernels], cpu_isa=info.cpu_isa,
            decode_path=info.decode_path)

    @rpc_errors
    async def ResetPrefixCache(self, request: pb.ResetPrefixCacheRequest, context) -> pb.ResetPrefixCacheResponse:
        """Admin (auth.ADMIN_METHODS): forget every cached prefix block, through EngineClient."""
        reset = await admin.reset_prefix_cache(self.state.door, self.state.keys.principal(context))
        return pb.ResetPrefixCacheResponse(reset=reset)
