from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetRoutingRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class SetRoutingRequest(_message.Message):
    __slots__ = ("model", "table_json")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TABLE_JSON_FIELD_NUMBER: _ClassVar[int]
    model: str
    table_json: str
    def __init__(self, model: _Optional[str] = ..., table_json: _Optional[str] = ...) -> None: ...

class ClearRoutingRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ShadowStats(_message.Message):
    __slots__ = ("requests", "errors", "mismatches", "max_abs_diff", "mean_latency_s")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    MISMATCHES_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_DIFF_FIELD_NUMBER: _ClassVar[int]
    MEAN_LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    requests: int
    errors: int
    mismatches: int
    max_abs_diff: float
    mean_latency_s: float
    def __init__(self, requests: _Optional[int] = ..., errors: _Optional[int] = ..., mismatches: _Optional[int] = ..., max_abs_diff: _Optional[float] = ..., mean_latency_s: _Optional[float] = ...) -> None: ...

class RoutingStatus(_message.Message):
    __slots__ = ("model", "source", "table_json", "ready_versions", "guard_rollbacks", "last_rollback_reason", "shadow", "file_error")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TABLE_JSON_FIELD_NUMBER: _ClassVar[int]
    READY_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    GUARD_ROLLBACKS_FIELD_NUMBER: _ClassVar[int]
    LAST_ROLLBACK_REASON_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    FILE_ERROR_FIELD_NUMBER: _ClassVar[int]
    model: str
    source: str
    table_json: str
    ready_versions: _containers.RepeatedScalarFieldContainer[int]
    guard_rollbacks: int
    last_rollback_reason: str
    shadow: ShadowStats
    file_error: str
    def __init__(self, model: _Optional[str] = ..., source: _Optional[str] = ..., table_json: _Optional[str] = ..., ready_versions: _Optional[_Iterable[int]] = ..., guard_rollbacks: _Optional[int] = ..., last_rollback_reason: _Optional[str] = ..., shadow: _Optional[_Union[ShadowStats, _Mapping]] = ..., file_error: _Optional[str] = ...) -> None: ...
