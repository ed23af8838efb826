"""What crosses between the front end and the engine-core process: msgspec structs, msgpack.

Requests and outputs are the engine's own dataclasses (io.py), carried as plain data keyed by
request id (the core's outputs carry token ids, no text: the front end detokenizes); errors cross as (kind, message, fields) and are rebuilt as the same EngineError
subclasses; admin commands are named. Nothing here is pickled.

front end -> core: Add, Abort, Command, Shutdown
core -> front end: Ready, StartFailed, Step, Stats, Rejected, Reply, Event
"""

from __future__ import annotations

from typing import Any

import msgspec

from .. import io
from ..engine import StepStats
from ..io import EngineStats, GenerationRequest, RequestOutput, RequestRejected, Violation

# ---- errors ---------------------------------------------------------------------------------
def _error_classes() -> dict[str, type[Exception]]:
    """Every error a request or command may end with, by class name: the engine's and the store's."""
    from ....adapters_store import errors as store

    classes: list[type[Exception]] = [
        io.EngineError, io.RequestRejected, io.QueueFull, io.EngineDraining, io.EngineUnavailable,
        io.AdapterUnavailable, io.AdapterBackendUnavailable, io.RequestFailed]
    classes += [cls for cls in vars(store).values() if isinstance(cls, type) and issubclass(cls, store.StoreError)]
    return {cls.__name__: cls for cls in classes}


_ERRORS = _error_classes()


class WireError(msgspec.Struct, array_like=True):
    kind: str
    message: str
    violations: list[tuple[str, str]] = []
    retry_after_s: float | None = None
    rule: str | None = None                     # AdapterValidationError's rule


def error_to_wire(error: BaseException) -> WireError:
    """Any exception as a WireError; one of no known class becomes RequestFailed."""
    kind = next((cls.__name__ for cls in type(error).__mro__ if _ERRORS.get(cls.__name__) is cls), None)
    if kind is None:
        return WireError("RequestFailed", f"the request failed inside the engine process ({type(error).__name__})")
    if isinstance(error, RequestRejected):
        return WireError(kind, str(error), [(v.field, v.description) for v in error.violations])
    rule = getattr(error, "rule", None)
    message = getattr(error, "detail", None) if rule is not None else None
    return WireError(kind, message or str(error), retry_after_s=getattr(error, "retry_after_s", None), rule=rule)


def error_from_wire(wire: WireError) -> Exception:
    cls = _ERRORS.get(wire.kind, io.RequestFailed)
    if issubclass(cls, RequestRejected):
        return RequestRejected.of([Violation(field, text) for field, text in wire.violations])
    if wire.rule is not None:
        return cls(wire.rule, wire.message)
    if wire.retry_after_s is not None:
        return cls(wire.message, wire.retry_after_s)
    return cls(wire.message)


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, BaseException):
        return msgspec.to_builtins(error_to_wire(obj))
    raise NotImplementedError(f"cannot send {type(obj).__name__} to the engine process")


def _dec_hook(kind: type, obj: Any) -> Any:
    if isinstance(kind, type) and issubclass(kind, BaseException):
        return error_from_wire(msgspec.convert(obj, WireError))
    raise NotImplementedError(f"cannot decode {kind}")


# ---- front end -> core ----------------------------------------------------------------------
class Add(msgspec.Struct, tag=True, array_like=True):
    """A ValidatedRequest's fields: the request the front end's Intake validated (defaults
    filled) and its prompt's checked token ids. The core queues it without validating again."""

    request: GenerationRequest
    prompt_ids: list[int]
    tokenizer_key: str | None = None     # ValidatedRequest.tokenizer_key


class Abort(msgspec.Struct, tag=True, array_like=True):
    request_id: str


class Command(msgspec.Struct, tag=True, array_like=True):
    """A named admin command (core.COMMANDS); the answer is a Reply with the same call_id."""

    call_id: int
    name: str
    args: list[Any]


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    pass


# ---- core -> front end ----------------------------------------------------------------------
class Ready(msgspec.Struct, tag=True, array_like=True):
    """The engine is built and warm. `info`: EngineInfo's fields as data (base_spec dropped:
    the front end derives it from config.json)."""

    info: dict[str, Any]
    pid: int


class StartFailed(msgspec.Struct, tag=True, array_like=True):
    message: str


class Step(msgspec.Struct, tag=True, array_like=True):
    """One engine step: its outputs, the stats after it, and the private adapter keys when
    that set changed (None: unchanged)."""

    outputs: list[RequestOutput]
    stats: EngineStats
    step: StepStats | None
    private_keys: list[str] | None = None


class Rejected(msgspec.Struct, tag=True, array_like=True):
    """An Add the engine refused (queue full, unknown adapter, grammar compile failure...)."""

    request_id: str
    error: WireError


class Reply(msgspec.Struct, tag=True, array_like=True):
    call_id: int
    value: Any = None
    error: WireError | None = None


class Event(msgspec.Struct, tag=True, array_like=True):
    """A hook event of the engine process: hook 'adapter' (device tier), 'store' (host tier)
    or 'constraint'; args as the hook takes them."""

    hook: str
    args: list[Any]


ToCore = Add | Abort | Command | Shutdown
FromCore = Ready | StartFailed | Step | Rejected | Reply | Event


class Codec:
    """msgpack encoder/decoder pair for one direction (not thread-safe: one per thread)."""

    def __init__(self, incoming: Any):
        self._encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
        self._decoder = msgspec.msgpack.Decoder(incoming, dec_hook=_dec_hook)

    def encode(self, message: Any) -> bytes:
        return self._encoder.encode(message)

    def decode(self, data: bytes) -> Any:
        return self._decoder.decode(data)


def core_codec() -> Codec:
    return Codec(ToCore)


def front_codec() -> Codec:
    return Codec(FromCore)


def info_to_wire(info: io.EngineInfo) -> dict[str, Any]:
    data = msgspec.to_builtins(info, enc_hook=_enc_hook)
    data.pop("base_spec", None)
    return data


def info_from_wire(data: dict[str, Any], base_spec: Any) -> io.EngineInfo:
    from ...layers.linear_choice import KernelChoice

    fields = dict(data)
    fields["linear_kernels"] = tuple(msgspec.convert(choice, KernelChoice) for choice in data["linear_kernels"])
    return io.EngineInfo(base_spec=base_spec, **fields)


__all__ = ["Add", "Abort", "Command", "Shutdown", "Ready", "StartFailed", "Step", "Rejected", "Reply",
           "Event", "Codec", "core_codec", "front_codec", "error_to_wire", "error_from_wire",
           "info_to_wire", "info_from_wire", "RequestOutput"]
