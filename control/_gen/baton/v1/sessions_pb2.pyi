from google.protobuf import struct_pb2 as _struct_pb2
from baton.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OriginateRequest(_message.Message):
    __slots__ = ("to", "account", "target", "params", "ring_timeout")
    TO_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    FROM_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    RING_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    to: str
    account: str
    target: str
    params: _struct_pb2.Struct
    ring_timeout: float
    def __init__(self, to: _Optional[str] = ..., account: _Optional[str] = ..., target: _Optional[str] = ..., params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., ring_timeout: _Optional[float] = ..., **kwargs) -> None: ...

class OriginateResponse(_message.Message):
    __slots__ = ("outcome", "sip_status", "session")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    SIP_STATUS_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    outcome: str
    sip_status: int
    session: _common_pb2.SessionInfo
    def __init__(self, outcome: _Optional[str] = ..., sip_status: _Optional[int] = ..., session: _Optional[_Union[_common_pb2.SessionInfo, _Mapping]] = ...) -> None: ...

class TransitionRequest(_message.Message):
    __slots__ = ("session_id", "target", "params")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    target: str
    params: _struct_pb2.Struct
    def __init__(self, session_id: _Optional[str] = ..., target: _Optional[str] = ..., params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class TransitionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: _common_pb2.SessionInfo
    def __init__(self, session: _Optional[_Union[_common_pb2.SessionInfo, _Mapping]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class HistoryRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class HistoryResponse(_message.Message):
    __slots__ = ("session_id", "live", "end_reason", "spans")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    END_REASON_FIELD_NUMBER: _ClassVar[int]
    SPANS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    live: bool
    end_reason: str
    spans: _containers.RepeatedCompositeFieldContainer[_common_pb2.ControlSpan]
    def __init__(self, session_id: _Optional[str] = ..., live: _Optional[bool] = ..., end_reason: _Optional[str] = ..., spans: _Optional[_Iterable[_Union[_common_pb2.ControlSpan, _Mapping]]] = ...) -> None: ...

class CostRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CostResponse(_message.Message):
    __slots__ = ("session_id", "currency", "detail", "amount_micros", "amount_decimal", "live")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MICROS_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_DECIMAL_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    currency: str
    detail: _struct_pb2.Struct
    amount_micros: int
    amount_decimal: str
    live: bool
    def __init__(self, session_id: _Optional[str] = ..., currency: _Optional[str] = ..., detail: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., amount_micros: _Optional[int] = ..., amount_decimal: _Optional[str] = ..., live: _Optional[bool] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("limit", "account")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    account: str
    def __init__(self, limit: _Optional[int] = ..., account: _Optional[str] = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("sessions", "live", "started_total", "now_wall_ns")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    STARTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NOW_WALL_NS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[_common_pb2.SessionInfo]
    live: int
    started_total: int
    now_wall_ns: int
    def __init__(self, sessions: _Optional[_Iterable[_Union[_common_pb2.SessionInfo, _Mapping]]] = ..., live: _Optional[int] = ..., started_total: _Optional[int] = ..., now_wall_ns: _Optional[int] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("account", "session_ids", "kinds")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    SESSION_IDS_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    account: str
    session_ids: _containers.RepeatedScalarFieldContainer[str]
    kinds: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, account: _Optional[str] = ..., session_ids: _Optional[_Iterable[str]] = ..., kinds: _Optional[_Iterable[str]] = ...) -> None: ...

class SessionEvent(_message.Message):
    __slots__ = ("session_id", "account", "kind", "module", "detail", "time_ns")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    TIME_NS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    account: str
    kind: str
    module: str
    detail: _struct_pb2.Struct
    time_ns: int
    def __init__(self, session_id: _Optional[str] = ..., account: _Optional[str] = ..., kind: _Optional[str] = ..., module: _Optional[str] = ..., detail: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., time_ns: _Optional[int] = ...) -> None: ...
