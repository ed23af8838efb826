"""GenerationService: Generate (unary) and GenerateStream (server streaming) over the AsyncEngine."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import AsyncIterator

from ...v1 import generation_pb2 as pb
from ...v1 import generation_pb2_grpc
from ..engine.io import RequestOutput, RequestRejected
from ..frontdoor.generation import admit
from .chat_tools import ChatTools, shape_stream, shape_unary, with_chat_tools
from .convert import stream_response, to_generation_request, unary_response, wire_violations
from .errors import ServiceError, invalid_argument, map_error, rpc_errors
from .state import ServiceState


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, state: ServiceState):
        self.state = state
        self.limits = state.config.request_limits()

    @rpc_errors
    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        tools = ChatTools()
        outputs = [output async for output in self._run(request.input, context, "Generate", tools)]
        return shape_unary(unary_response(outputs), tools)

    @rpc_errors
    async def GenerateStream(self, request: pb.GenerateStreamRequest, context):
        tools = ChatTools()
        async with contextlib.aclosing(self._run(request.input, context, "GenerateStream", tools)) as outputs:
            async for output in outputs:
                yield shape_stream(stream_response(output), output, tools)

    async def _run(self, message: pb.GenerationInput, context, method: str,
                   tools: ChatTools) -> AsyncIterator[RequestOutput]:
        """Yield the engine's deltas; closing early (cancel, deadline) aborts the engine request.
        `tools` receives the request's tool-call / reasoning parsing (chat_tools.py)."""
        metrics = self.state.metrics
        last: RequestOutput | None = None
        asked_adapter = bool(message.adapter_id)
        context.set_trailing_metadata(self.state.replica_trailer())
        try:
            tenant = admit(self.state.door, self.state.keys.principal(context)).tenant
            request = to_generation_request(message, uuid.uuid4().hex, tenant, self.limits)
            engine = self.state.require_engine()
            request, found = with_chat_tools(request, message, self.state.config, engine.info.chat_template)
            tools.shaper = found.shaper
            previous = time.monotonic()
            async with contextlib.aclosing(engine.generate(request)) as outputs:
                async for output in outputs:
                    now = time.monotonic()
                    if metrics is not None and output.token_ids and last is not None:
                        metrics.token_delta(now - previous, len(output.token_ids))
                    previous, last = now, output
                    yield output
        except asyncio.CancelledError:
            code = "DEADLINE_EXCEEDED" if _deadline_passed(context) else "CANCELLED"
            self._record(method, code, last, asked_adapter)
            raise
        except GeneratorExit:                               # the stream closed (cancel or deadline)
            self._record(method, "DEADLINE_EXCEEDED" if _deadline_passed(context) else "CANCELLED", last,
                         asked_adapter)
            raise
        except Exception as error:  # noqa: BLE001 - mapped here once, so metrics see the code
            mapped = map_error(_to_wire(error))
            self._record(method, mapped.code.name, last, asked_adapter)
            raise ServiceError(mapped.code, mapped.message, mapped.violations, mapped.retry_after_s) from None
        self._record(method, "OK", last, asked_adapter)

    def _record(self, method: str, code: str, last: RequestOutput | None, asked_adapter: bool) -> None:
        """Metrics for one finished RPC; the adapter label comes from the engine's resolved key only."""
        metrics = self.state.metrics
        if metrics is None:
            return
        finished = last is not None and last.finished
        reason = last.finish_reason.value if finished and last.finish_reason else "none"
        key = last.adapter_key if last is not None else None
        engine = self.state.engine
        private = bool(key) and engine is not None and engine.adapter_is_private(key)
        metrics.request_finished(
            method, code, reason, key, private=private, unresolved=asked_adapter and not key,
            prompt_tokens=last.prompt_tokens if finished else 0,
            generated_tokens=last.generated_tokens if finished else 0,
            timing=last.timing if finished else None)


def _to_wire(error: Exception) -> Exception:
    """The engine names fields inside GenerationRequest; clients see this API's proto paths."""
    if isinstance(error, RequestRejected):
        return invalid_argument(wire_violations(error))
    return error


# A cancel this close to the call's deadline is the deadline: the caller's own timer fires first
# (the server's deadline starts when the call is read, after transit and queueing, and the
# fleet's front end forwards the deadline it computed), so its cancel arrives a little early.
DEADLINE_SLACK_S = 0.5


def _deadline_passed(context) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= DEADLINE_SLACK_S

