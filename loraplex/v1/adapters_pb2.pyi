import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AdapterState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_STATE_UNSPECIFIED: _ClassVar[AdapterState]
    ADAPTER_STATE_READY: _ClassVar[AdapterState]
    ADAPTER_STATE_QUARANTINED: _ClassVar[AdapterState]
    ADAPTER_STATE_DELETING: _ClassVar[AdapterState]

class AdapterFile(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_FILE_UNSPECIFIED: _ClassVar[AdapterFile]
    ADAPTER_FILE_CONFIG: _ClassVar[AdapterFile]
    ADAPTER_FILE_WEIGHTS: _ClassVar[AdapterFile]
    ADAPTER_FILE_CHAT_TEMPLATE: _ClassVar[AdapterFile]
    ADAPTER_FILE_TOKENIZER: _ClassVar[AdapterFile]
    ADAPTER_FILE_TOKENIZER_CONFIG: _ClassVar[AdapterFile]
    ADAPTER_FILE_SPECIAL_TOKENS_MAP: _ClassVar[AdapterFile]
ADAPTER_STATE_UNSPECIFIED: AdapterState
ADAPTER_STATE_READY: AdapterState
ADAPTER_STATE_QUARANTINED: AdapterState
ADAPTER_STATE_DELETING: AdapterState
ADAPTER_FILE_UNSPECIFIED: AdapterFile
ADAPTER_FILE_CONFIG: AdapterFile
ADAPTER_FILE_WEIGHTS: AdapterFile
ADAPTER_FILE_CHAT_TEMPLATE: AdapterFile
ADAPTER_FILE_TOKENIZER: AdapterFile
ADAPTER_FILE_TOKENIZER_CONFIG: AdapterFile
ADAPTER_FILE_SPECIAL_TOKENS_MAP: AdapterFile

class DeclaredFile(_message.Message):
    __slots__ = ("file", "size", "sha256")
    FILE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    file: AdapterFile
    size: int
    sha256: str
    def __init__(self, file: _Optional[_Union[AdapterFile, str]] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class UploadMetadata(_message.Message):
    __slots__ = ("adapter_id", "config_size", "config_sha256", "weights_size", "weights_sha256", "private", "allow_base_mismatch", "chat_template_size", "chat_template_sha256", "tokenizer_files")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_SIZE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_SHA256_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SIZE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_FIELD_NUMBER: _ClassVar[int]
    ALLOW_BASE_MISMATCH_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_SHA256_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FILES_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    config_size: int
    config_sha256: str
    weights_size: int
    weights_sha256: str
    private: bool
    allow_base_mismatch: bool
    chat_template_size: int
    chat_template_sha256: str
    tokenizer_files: _containers.RepeatedCompositeFieldContainer[DeclaredFile]
    def __init__(self, adapter_id: _Optional[str] = ..., config_size: _Optional[int] = ..., config_sha256: _Optional[str] = ..., weights_size: _Optional[int] = ..., weights_sha256: _Optional[str] = ..., private: _Optional[bool] = ..., allow_base_mismatch: _Optional[bool] = ..., chat_template_size: _Optional[int] = ..., chat_template_sha256: _Optional[str] = ..., tokenizer_files: _Optional[_Iterable[_Union[DeclaredFile, _Mapping]]] = ...) -> None: ...

class UploadChunk(_message.Message):
    __slots__ = ("file", "data")
    FILE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    file: AdapterFile
    data: bytes
    def __init__(self, file: _Optional[_Union[AdapterFile, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadAdapterRequest(_message.Message):
    __slots__ = ("metadata", "chunk")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    metadata: UploadMetadata
    chunk: UploadChunk
    def __init__(self, metadata: _Optional[_Union[UploadMetadata, _Mapping]] = ..., chunk: _Optional[_Union[UploadChunk, _Mapping]] = ...) -> None: ...

class AdapterInfo(_message.Message):
    __slots__ = ("adapter_id", "version", "sha256", "size_bytes", "rank", "lora_alpha", "use_rslora", "target_modules", "dtype", "peft_type", "base_model", "base_fingerprint", "owner", "created_at", "state", "has_chat_template", "vocab_size")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    USE_RSLORA_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PEFT_TYPE_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    BASE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    HAS_CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    version: int
    sha256: str
    size_bytes: int
    rank: int
    lora_alpha: float
    use_rslora: bool
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    dtype: str
    peft_type: str
    base_model: str
    base_fingerprint: str
    owner: str
    created_at: _timestamp_pb2.Timestamp
    state: AdapterState
    has_chat_template: bool
    vocab_size: int
    def __init__(self, adapter_id: _Optional[str] = ..., version: _Optional[int] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., rank: _Optional[int] = ..., lora_alpha: _Optional[float] = ..., use_rslora: _Optional[bool] = ..., target_modules: _Optional[_Iterable[str]] = ..., dtype: _Optional[str] = ..., peft_type: _Optional[str] = ..., base_model: _Optional[str] = ..., base_fingerprint: _Optional[str] = ..., owner: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state: _Optional[_Union[AdapterState, str]] = ..., has_chat_template: _Optional[bool] = ..., vocab_size: _Optional[int] = ...) -> None: ...

class UploadAdapterResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: AdapterInfo
    def __init__(self, adapter: _Optional[_Union[AdapterInfo, _Mapping]] = ...) -> None: ...

class RegisterAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "path", "private", "allow_base_mismatch")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_FIELD_NUMBER: _ClassVar[int]
    ALLOW_BASE_MISMATCH_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    path: str
    private: bool
    allow_base_mismatch: bool
    def __init__(self, adapter_id: _Optional[str] = ..., path: _Optional[str] = ..., private: _Optional[bool] = ..., allow_base_mismatch: _Optional[bool] = ...) -> None: ...

class RegisterAdapterResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: AdapterInfo
    def __init__(self, adapter: _Optional[_Union[AdapterInfo, _Mapping]] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters",)
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterInfo]
    def __init__(self, adapters: _Optional[_Iterable[_Union[AdapterInfo, _Mapping]]] = ...) -> None: ...

class GetAdapterRequest(_message.Message):
    __slots__ = ("adapter_id",)
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    def __init__(self, adapter_id: _Optional[str] = ...) -> None: ...

class GetAdapterResponse(_message.Message):
    __slots__ = ("adapter", "versions")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    adapter: AdapterInfo
    versions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, adapter: _Optional[_Union[AdapterInfo, _Mapping]] = ..., versions: _Optional[_Iterable[int]] = ...) -> None: ...

class DeleteAdapterRequest(_message.Message):
    __slots__ = ("adapter_id",)
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    def __init__(self, adapter_id: _Optional[str] = ...) -> None: ...

class DeleteAdapterResponse(_message.Message):
    __slots__ = ("deleted_versions",)
    DELETED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    deleted_versions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, deleted_versions: _Optional[_Iterable[int]] = ...) -> None: ...
