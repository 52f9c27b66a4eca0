from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "account", "number", "from_uri", "to_uri", "direction", "module", "level", "node", "live", "started_wall_ns", "ended_wall_ns", "end_reason", "params", "app")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    FROM_URI_FIELD_NUMBER: _ClassVar[int]
    TO_URI_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    STARTED_WALL_NS_FIELD_NUMBER: _ClassVar[int]
    ENDED_WALL_NS_FIELD_NUMBER: _ClassVar[int]
    END_REASON_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    APP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    account: str
    number: str
    from_uri: str
    to_uri: str
    direction: str
    module: str
    level: str
    node: str
    live: bool
    started_wall_ns: int
    ended_wall_ns: int
    end_reason: str
    params: _struct_pb2.Struct
    app: str
    def __init__(self, session_id: _Optional[str] = ..., account: _Optional[str] = ..., number: _Optional[str] = ..., from_uri: _Optional[str] = ..., to_uri: _Optional[str] = ..., direction: _Optional[str] = ..., module: _Optional[str] = ..., level: _Optional[str] = ..., node: _Optional[str] = ..., live: _Optional[bool] = ..., started_wall_ns: _Optional[int] = ..., ended_wall_ns: _Optional[int] = ..., end_reason: _Optional[str] = ..., params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., app: _Optional[str] = ...) -> None: ...

class ControlSpan(_message.Message):
    __slots__ = ("module", "level", "node", "reason", "start_wall_ns", "end_wall_ns", "end_reason", "duration_ns")
    MODULE_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    START_WALL_NS_FIELD_NUMBER: _ClassVar[int]
    END_WALL_NS_FIELD_NUMBER: _ClassVar[int]
    END_REASON_FIELD_NUMBER: _ClassVar[int]
    DURATION_NS_FIELD_NUMBER: _ClassVar[int]
    module: str
    level: str
    node: str
    reason: str
    start_wall_ns: int
    end_wall_ns: int
    end_reason: str
    duration_ns: int
    def __init__(self, module: _Optional[str] = ..., level: _Optional[str] = ..., node: _Optional[str] = ..., reason: _Optional[str] = ..., start_wall_ns: _Optional[int] = ..., end_wall_ns: _Optional[int] = ..., end_reason: _Optional[str] = ..., duration_ns: _Optional[int] = ...) -> None: ...
