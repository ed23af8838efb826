"""A real gRPC server with scripted loraplex servicers, for testing the client SDK's error
mapping, retries, deadlines and metadata without a model.

Each RPC pops the next scripted action for its method (`Reply`, `Fail`, `Stream`) or, when the
script is empty, answers with a small default response. Every call is recorded.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import defaultdict, deque
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from loraplex.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc
from loraplex.v1 import server_pb2, server_pb2_grpc


@dataclass
class Reply:
    response: Any
    delay_s: float = 0.0


@dataclass
class Fail:
    code: grpc.StatusCode
    message: str
    violations: dict[str, str] = field(default_factory=dict)
    retry_after_s: float | None = None

    def status(self) -> grpc.Status:
        proto = status_pb2.Status(code=getattr(code_pb2, self.code.name), message=self.message)
        if self.violations:
            proto.details.append(_pack(error_details_pb2.BadRequest(field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=k, description=v)
                for k, v in self.violations.items()])))
        if self.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_after_s * 1e9))
            proto.details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
        return rpc_status.to_status(proto)


@dataclass
class Stream:
    responses: list[Any]
    then: Fail | None = None
    delay_s: float = 0.0


@dataclass
class Call:
    method: str
    metadata: dict[str, str]
    request: Any
    at: float


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def chunk(text: str, ids: list[int], finish=generation_pb2.FINISH_REASON_UNSPECIFIED, **extra):
    return generation_pb2.GenerateStreamResponse(text=text, token_ids=ids, finish_reason=finish, **extra)


DEFAULT_GENERATION = generation_pb2.GenerateResponse(
    text=" hello", token_ids=[5, 6], finish_reason=generation_pb2.FINISH_REASON_LENGTH,
    usage=generation_pb2.Usage(prompt_tokens=3, generated_tokens=2),
    timing=generation_pb2.Timing(queue_seconds=0.01, first_token_seconds=0.02, total_seconds=0.03))
DEFAULT_STREAM = [chunk(" hel", [5]), chunk("lo", [6], generation_pb2.FINISH_REASON_LENGTH,
                                             usage=DEFAULT_GENERATION.usage, timing=DEFAULT_GENERATION.timing)]


class Script:
    """Scripted actions per method name and the record of calls."""

    def __init__(self):
        self.actions: dict[str, deque] = defaultdict(deque)
        self.calls: list[Call] = []
        self.uploads: list[dict[str, bytes]] = []
        self._lock = threading.Lock()

    def push(self, method: str, *actions) -> None:
        self.actions[method].extend(actions)

    def calls_to(self, method: str) -> list[Call]:
        return [call for call in self.calls if call.method == method]

    def take(self, method: str, request: Any, context) -> Any:
        with self._lock:
            self.calls.append(Call(method, dict(context.invocation_metadata()), request, time.monotonic()))
            return self.actions[method].popleft() if self.actions[method] else None


def _unary(script: Script, method: str, request, context, default):
    action = script.take(method, request, context) or Reply(default)
    if isinstance(action, Fail):
        context.abort_with_status(action.status())
    time.sleep(action.delay_s)
    return action.response


class Generation(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, script: Script):
        self.script = script

    def Generate(self, request, context):
        return _unary(self.script, "Generate", request, context, DEFAULT_GENERATION)

    def GenerateStream(self, request, context):
        action = self.script.take("GenerateStream", request, context) or Stream(DEFAULT_STREAM)
        if isinstance(action, Fail):
            context.abort_with_status(action.status())
        for response in action.responses:
            time.sleep(action.delay_s)
            yield response
        if action.then is not None:
            context.abort_with_status(action.then.status())


def adapter_message(name: str, version: int = 1, sha256: str = "ab" * 32) -> adapters_pb2.AdapterInfo:
    info = adapters_pb2.AdapterInfo(adapter_id=name, version=version, sha256=sha256, size_bytes=1024, rank=4,
                                    lora_alpha=8.0, target_modules=["q_proj", "v_proj"], dtype="float32",
                                    peft_type="LORA", state=adapters_pb2.ADAPTER_STATE_READY)
    info.created_at.FromSeconds(1_700_000_000)
    return info


class Adapters(adapters_pb2_grpc.AdapterServiceServicer):
    """UploadAdapter reassembles the files and checks sizes and sha256 like the real server."""

    def __init__(self, script: Script):
        self.script = script

    def UploadAdapter(self, request_iterator, context):
        messages = list(request_iterator)
        action = self.script.take("UploadAdapter", messages, context)
        if isinstance(action, Fail):
            context.abort_with_status(action.status())
        meta = messages[0].metadata
        files = {"config": b"", "weights": b""}
        for message in messages[1:]:
            assert len(message.chunk.data) <= 2**20
            name = "config" if message.chunk.file == adapters_pb2.ADAPTER_FILE_CONFIG else "weights"
            files[name] += message.chunk.data
        for name, data in files.items():
            if len(data) != getattr(meta, f"{name}_size") or \
                    hashlib.sha256(data).hexdigest() != getattr(meta, f"{name}_sha256"):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{name} size or sha256 mismatch")
        self.script.uploads.append(files)
        return adapters_pb2.UploadAdapterResponse(adapter=adapter_message(
            meta.adapter_id, sha256=meta.weights_sha256))

    def RegisterAdapter(self, request, context):
        default = adapters_pb2.RegisterAdapterResponse(adapter=adapter_message(request.adapter_id))
        return _unary(self.script, "RegisterAdapter", request, context, default)

    def ListAdapters(self, request, context):
        default = adapters_pb2.ListAdaptersResponse(adapters=[adapter_message("tone"), adapter_message("legal", 2)])
        return _unary(self.script, "ListAdapters", request, context, default)

    def GetAdapter(self, request, context):
        default = adapters_pb2.GetAdapterResponse(adapter=adapter_message(request.adapter_id, 2), versions=[1, 2])
        return _unary(self.script, "GetAdapter", request, context, default)

    def DeleteAdapter(self, request, context):
        default = adapters_pb2.DeleteAdapterResponse(deleted_versions=[1, 2])
        return _unary(self.script, "DeleteAdapter", request, context, default)


class Server(server_pb2_grpc.ServerServiceServicer):
    def __init__(self, script: Script):
        self.script = script

    def Info(self, request, context):
        default = server_pb2.InfoResponse(version="0.1.0", model="tiny", architecture="LlamaForCausalLM",
                                          quantization="none", dtype="float32", device="cpu",
                                          limits=server_pb2.Limits(max_new_tokens=64, max_loras=2))
        return _unary(self.script, "Info", request, context, default)


class ScriptedServer:
    """Start with `ScriptedServer()`; `.address`, `.script`, `.health` (real HealthServicer); `.stop()`."""

    def __init__(self):
        self.script = Script()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(Generation(self.script), self.server)
        adapters_pb2_grpc.add_AdapterServiceServicer_to_server(Adapters(self.script), self.server)
        server_pb2_grpc.add_ServerServiceServicer_to_server(Server(self.script), self.server)
        self.health = health.HealthServicer()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{port}"
        self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=None)
