from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SurveyResultsRequest(_message.Message):
    __slots__ = ("session_id", "survey", "since_wall_ns", "limit")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SURVEY_FIELD_NUMBER: _ClassVar[int]
    SINCE_WALL_NS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    survey: str
    since_wall_ns: int
    limit: int
    def __init__(self, session_id: _Optional[str] = ..., survey: _Optional[str] = ..., since_wall_ns: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class SurveyAnswer(_message.Message):
    __slots__ = ("question", "answer", "attempts", "answered_wall_ns", "answered")
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    ANSWERED_WALL_NS_FIELD_NUMBER: _ClassVar[int]
    ANSWERED_FIELD_NUMBER: _ClassVar[int]
    question: str
    answer: str
    attempts: int
    answered_wall_ns: int
    answered: bool
    def __init__(self, question: _Optional[str] = ..., answer: _Optional[str] = ..., attempts: _Optional[int] = ..., answered_wall_ns: _Optional[int] = ..., answered: _Optional[bool] = ...) -> None: ...

class SurveyRun(_message.Message):
    __slots__ = ("run_id", "session_id", "survey", "node", "status", "caller", "number", "started_wall_ns", "ended_wall_ns", "answers")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SURVEY_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    STARTED_WALL_NS_FIELD_NUMBER: _ClassVar[int]
    ENDED_WALL_NS_FIELD_NUMBER: _ClassVar[int]
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    run_id: int
    session_id: str
    survey: str
    node: str
    status: str
    caller: str
    number: str
    started_wall_ns: int
    ended_wall_ns: int
    answers: _containers.RepeatedCompositeFieldContainer[SurveyAnswer]
    def __init__(self, run_id: _Optional[int] = ..., session_id: _Optional[str] = ..., survey: _Optional[str] = ..., node: _Optional[str] = ..., status: _Optional[str] = ..., caller: _Optional[str] = ..., number: _Optional[str] = ..., started_wall_ns: _Optional[int] = ..., ended_wall_ns: _Optional[int] = ..., answers: _Optional[_Iterable[_Union[SurveyAnswer, _Mapping]]] = ...) -> None: ...

class SurveyResultsResponse(_message.Message):
    __slots__ = ("runs",)
    RUNS_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[SurveyRun]
    def __init__(self, runs: _Optional[_Iterable[_Union[SurveyRun, _Mapping]]] = ...) -> None: ...

class VerifyCreateRequest(_message.Message):
    __slots__ = ("to", "channel", "code_length", "ttl_seconds", "max_attempts", "code", "ring_timeout", "app")
    TO_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    CODE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    FROM_FIELD_NUMBER: _ClassVar[int]
    RING_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    APP_FIELD_NUMBER: _ClassVar[int]
    to: str
    channel: str
    code_length: int
    ttl_seconds: int
    max_attempts: int
    code: str
    ring_timeout: float
    app: str
    def __init__(self, to: _Optional[str] = ..., channel: _Optional[str] = ..., code_length: _Optional[int] = ..., ttl_seconds: _Optional[int] = ..., max_attempts: _Optional[int] = ..., code: _Optional[str] = ..., ring_timeout: _Optional[float] = ..., app: _Optional[str] = ..., **kwargs) -> None: ...

class Verification(_message.Message):
    __slots__ = ("verification_id", "account", "to", "channel", "status", "attempts", "max_attempts", "attempts_left", "created_wall_ns", "expires_wall_ns", "session_id", "call_outcome", "code", "code_length")
    VERIFICATION_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_LEFT_FIELD_NUMBER: _ClassVar[int]
    CREATED_WALL_NS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_WALL_NS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CALL_OUTCOME_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    CODE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    verification_id: str
    account: str
    to: str
    channel: str
    status: str
    attempts: int
    max_attempts: int
    attempts_left: int
    created_wall_ns: int
    expires_wall_ns: int
    session_id: str
    call_outcome: str
    code: str
    code_length: int
    def __init__(self, verification_id: _Optional[str] = ..., account: _Optional[str] = ..., to: _Optional[str] = ..., channel: _Optional[str] = ..., status: _Optional[str] = ..., attempts: _Optional[int] = ..., max_attempts: _Optional[int] = ..., attempts_left: _Optional[int] = ..., created_wall_ns: _Optional[int] = ..., expires_wall_ns: _Optional[int] = ..., session_id: _Optional[str] = ..., call_outcome: _Optional[str] = ..., code: _Optional[str] = ..., code_length: _Optional[int] = ...) -> None: ...

class VerifyCheckRequest(_message.Message):
    __slots__ = ("verification_id", "to", "code")
    VERIFICATION_ID_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    verification_id: str
    to: str
    code: str
    def __init__(self, verification_id: _Optional[str] = ..., to: _Optional[str] = ..., code: _Optional[str] = ...) -> None: ...

class VerifyCheckResponse(_message.Message):
    __slots__ = ("valid", "verification")
    VALID_FIELD_NUMBER: _ClassVar[int]
    VERIFICATION_FIELD_NUMBER: _ClassVar[int]
    valid: bool
    verification: Verification
    def __init__(self, valid: _Optional[bool] = ..., verification: _Optional[_Union[Verification, _Mapping]] = ...) -> None: ...

class VerifyGetRequest(_message.Message):
    __slots__ = ("verification_id",)
    VERIFICATION_ID_FIELD_NUMBER: _ClassVar[int]
    verification_id: str
    def __init__(self, verification_id: _Optional[str] = ...) -> None: ...
