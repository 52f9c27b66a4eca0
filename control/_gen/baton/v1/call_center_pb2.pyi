from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class QueueStatsRequest(_message.Message):
    __slots__ = ("queue",)
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    queue: str
    def __init__(self, queue: _Optional[str] = ...) -> None: ...

class AgentCounts(_message.Message):
    __slots__ = ("available", "busy", "wrap_up", "offline")
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    BUSY_FIELD_NUMBER: _ClassVar[int]
    WRAP_UP_FIELD_NUMBER: _ClassVar[int]
    OFFLINE_FIELD_NUMBER: _ClassVar[int]
    available: int
    busy: int
    wrap_up: int
    offline: int
    def __init__(self, available: _Optional[int] = ..., busy: _Optional[int] = ..., wrap_up: _Optional[int] = ..., offline: _Optional[int] = ...) -> None: ...

class WaitingCaller(_message.Message):
    __slots__ = ("session_id", "position", "waited_seconds", "ringing_agent", "announcement")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    WAITED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RINGING_AGENT_FIELD_NUMBER: _ClassVar[int]
    ANNOUNCEMENT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    position: int
    waited_seconds: float
    ringing_agent: str
    announcement: str
    def __init__(self, session_id: _Optional[str] = ..., position: _Optional[int] = ..., waited_seconds: _Optional[float] = ..., ringing_agent: _Optional[str] = ..., announcement: _Optional[str] = ...) -> None: ...

class QueueStat(_message.Message):
    __slots__ = ("name", "account", "waiting", "longest_wait_seconds", "served", "abandoned", "timed_out", "rejected_full", "average_wait_seconds", "average_handle_seconds", "max_size", "agents", "callers")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    LONGEST_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SERVED_FIELD_NUMBER: _ClassVar[int]
    ABANDONED_FIELD_NUMBER: _ClassVar[int]
    TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FULL_FIELD_NUMBER: _ClassVar[int]
    AVERAGE_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AVERAGE_HANDLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_SIZE_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    CALLERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    account: str
    waiting: int
    longest_wait_seconds: float
    served: int
    abandoned: int
    timed_out: int
    rejected_full: int
    average_wait_seconds: float
    average_handle_seconds: float
    max_size: int
    agents: AgentCounts
    callers: _containers.RepeatedCompositeFieldContainer[WaitingCaller]
    def __init__(self, name: _Optional[str] = ..., account: _Optional[str] = ..., waiting: _Optional[int] = ..., longest_wait_seconds: _Optional[float] = ..., served: _Optional[int] = ..., abandoned: _Optional[int] = ..., timed_out: _Optional[int] = ..., rejected_full: _Optional[int] = ..., average_wait_seconds: _Optional[float] = ..., average_handle_seconds: _Optional[float] = ..., max_size: _Optional[int] = ..., agents: _Optional[_Union[AgentCounts, _Mapping]] = ..., callers: _Optional[_Iterable[_Union[WaitingCaller, _Mapping]]] = ...) -> None: ...

class QueueStatsResponse(_message.Message):
    __slots__ = ("queues",)
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    queues: _containers.RepeatedCompositeFieldContainer[QueueStat]
    def __init__(self, queues: _Optional[_Iterable[_Union[QueueStat, _Mapping]]] = ...) -> None: ...

class ListAgentsRequest(_message.Message):
    __slots__ = ("queue",)
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    queue: str
    def __init__(self, queue: _Optional[str] = ...) -> None: ...

class Agent(_message.Message):
    __slots__ = ("name", "state", "user", "contact", "queues", "idle_seconds", "calls", "session_id", "signed_out")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    CONTACT_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    IDLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNED_OUT_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: str
    user: str
    contact: str
    queues: _containers.RepeatedScalarFieldContainer[str]
    idle_seconds: float
    calls: int
    session_id: str
    signed_out: bool
    def __init__(self, name: _Optional[str] = ..., state: _Optional[str] = ..., user: _Optional[str] = ..., contact: _Optional[str] = ..., queues: _Optional[_Iterable[str]] = ..., idle_seconds: _Optional[float] = ..., calls: _Optional[int] = ..., session_id: _Optional[str] = ..., signed_out: _Optional[bool] = ...) -> None: ...

class ListAgentsResponse(_message.Message):
    __slots__ = ("agents",)
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[Agent]
    def __init__(self, agents: _Optional[_Iterable[_Union[Agent, _Mapping]]] = ...) -> None: ...

class SetAgentStateRequest(_message.Message):
    __slots__ = ("agent", "state")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    agent: str
    state: str
    def __init__(self, agent: _Optional[str] = ..., state: _Optional[str] = ...) -> None: ...
