from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ResetPrefixCacheRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResetPrefixCacheResponse(_message.Message):
    __slots__ = ("reset",)
    RESET_FIELD_NUMBER: _ClassVar[int]
    reset: bool
    def __init__(self, reset: _Optional[bool] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_input_tokens", "max_total_tokens", "max_new_tokens", "max_stop_sequences", "max_queued_requests", "max_loras", "max_lora_rank", "max_message_bytes", "max_adapter_bytes")
    MAX_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_STOP_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_LORAS_FIELD_NUMBER: _ClassVar[int]
    MAX_LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_ADAPTER_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_input_tokens: int
    max_total_tokens: int
    max_new_tokens: int
    max_stop_sequences: int
    max_queued_requests: int
    max_loras: int
    max_lora_rank: int
    max_message_bytes: int
    max_adapter_bytes: int
    def __init__(self, max_input_tokens: _Optional[int] = ..., max_total_tokens: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., max_stop_sequences: _Optional[int] = ..., max_queued_requests: _Optional[int] = ..., max_loras: _Optional[int] = ..., max_lora_rank: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_adapter_bytes: _Optional[int] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("version", "model", "architecture", "quantization", "dtype", "base_fingerprint", "limits", "auth_enabled", "device", "linear_weight_bytes", "linear_kernels", "cpu_isa", "decode_path")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BASE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    AUTH_ENABLED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    LINEAR_WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    LINEAR_KERNELS_FIELD_NUMBER: _ClassVar[int]
    CPU_ISA_FIELD_NUMBER: _ClassVar[int]
    DECODE_PATH_FIELD_NUMBER: _ClassVar[int]
    version: str
    model: str
    architecture: str
    quantization: str
    dtype: str
    base_fingerprint: str
    limits: Limits
    auth_enabled: bool
    device: str
    linear_weight_bytes: int
    linear_kernels: _containers.RepeatedScalarFieldContainer[str]
    cpu_isa: str
    decode_path: str
    def __init__(self, version: _Optional[str] = ..., model: _Optional[str] = ..., architecture: _Optional[str] = ..., quantization: _Optional[str] = ..., dtype: _Optional[str] = ..., base_fingerprint: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., auth_enabled: _Optional[bool] = ..., device: _Optional[str] = ..., linear_weight_bytes: _Optional[int] = ..., linear_kernels: _Optional[_Iterable[str]] = ..., cpu_isa: _Optional[str] = ..., decode_path: _Optional[str] = ...) -> None: ...
