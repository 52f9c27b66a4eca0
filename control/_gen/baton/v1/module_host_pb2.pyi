from google.protobuf import struct_pb2 as _struct_pb2
from baton.v1 import billing_pb2 as _billing_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VendorMessage(_message.Message):
    __slots__ = ("register", "take", "decline", "command", "ping")
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    TAKE_FIELD_NUMBER: _ClassVar[int]
    DECLINE_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    register: Register
    take: Take
    decline: Decline
    command: Command
    ping: Ping
    def __init__(self, register: _Optional[_Union[Register, _Mapping]] = ..., take: _Optional[_Union[Take, _Mapping]] = ..., decline: _Optional[_Union[Decline, _Mapping]] = ..., command: _Optional[_Union[Command, _Mapping]] = ..., ping: _Optional[_Union[Ping, _Mapping]] = ...) -> None: ...

class Register(_message.Message):
    __slots__ = ("module_code", "secret", "vendor", "instance", "max_sessions")
    MODULE_CODE_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    VENDOR_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    module_code: str
    secret: str
    vendor: str
    instance: str
    max_sessions: int
    def __init__(self, module_code: _Optional[str] = ..., secret: _Optional[str] = ..., vendor: _Optional[str] = ..., instance: _Optional[str] = ..., max_sessions: _Optional[int] = ...) -> None: ...

class Take(_message.Message):
    __slots__ = ("offer_id", "session_id")
    OFFER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    offer_id: str
    session_id: str
    def __init__(self, offer_id: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class Decline(_message.Message):
    __slots__ = ("offer_id", "session_id", "reason")
    OFFER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    offer_id: str
    session_id: str
    reason: str
    def __init__(self, offer_id: _Optional[str] = ..., session_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Ping(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: int
    def __init__(self, nonce: _Optional[int] = ...) -> None: ...

class Command(_message.Message):
    __slots__ = ("command_id", "session_id", "answer", "play", "say", "gather", "record", "dial", "enqueue", "join_conference", "send_digits", "set_value", "hangup", "transfer", "release", "stop_media")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    PLAY_FIELD_NUMBER: _ClassVar[int]
    SAY_FIELD_NUMBER: _ClassVar[int]
    GATHER_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    DIAL_FIELD_NUMBER: _ClassVar[int]
    ENQUEUE_FIELD_NUMBER: _ClassVar[int]
    JOIN_CONFERENCE_FIELD_NUMBER: _ClassVar[int]
    SEND_DIGITS_FIELD_NUMBER: _ClassVar[int]
    SET_VALUE_FIELD_NUMBER: _ClassVar[int]
    HANGUP_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    STOP_MEDIA_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    session_id: str
    answer: Answer
    play: Play
    say: Say
    gather: Gather
    record: Record
    dial: Dial
    enqueue: Enqueue
    join_conference: JoinConference
    send_digits: SendDigits
    set_value: SetValue
    hangup: Hangup
    transfer: Transfer
    release: Release
    stop_media: StopMedia
    def __init__(self, command_id: _Optional[str] = ..., session_id: _Optional[str] = ..., answer: _Optional[_Union[Answer, _Mapping]] = ..., play: _Optional[_Union[Play, _Mapping]] = ..., say: _Optional[_Union[Say, _Mapping]] = ..., gather: _Optional[_Union[Gather, _Mapping]] = ..., record: _Optional[_Union[Record, _Mapping]] = ..., dial: _Optional[_Union[Dial, _Mapping]] = ..., enqueue: _Optional[_Union[Enqueue, _Mapping]] = ..., join_conference: _Optional[_Union[JoinConference, _Mapping]] = ..., send_digits: _Optional[_Union[SendDigits, _Mapping]] = ..., set_value: _Optional[_Union[SetValue, _Mapping]] = ..., hangup: _Optional[_Union[Hangup, _Mapping]] = ..., transfer: _Optional[_Union[Transfer, _Mapping]] = ..., release: _Optional[_Union[Release, _Mapping]] = ..., stop_media: _Optional[_Union[StopMedia, _Mapping]] = ...) -> None: ...

class Answer(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Play(_message.Message):
    __slots__ = ("url", "loop")
    URL_FIELD_NUMBER: _ClassVar[int]
    LOOP_FIELD_NUMBER: _ClassVar[int]
    url: str
    loop: int
    def __init__(self, url: _Optional[str] = ..., loop: _Optional[int] = ...) -> None: ...

class Say(_message.Message):
    __slots__ = ("text", "voice", "loop")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    VOICE_FIELD_NUMBER: _ClassVar[int]
    LOOP_FIELD_NUMBER: _ClassVar[int]
    text: str
    voice: str
    loop: int
    def __init__(self, text: _Optional[str] = ..., voice: _Optional[str] = ..., loop: _Optional[int] = ...) -> None: ...

class Gather(_message.Message):
    __slots__ = ("num_digits", "timeout", "finish_on_key", "say", "play")
    NUM_DIGITS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    FINISH_ON_KEY_FIELD_NUMBER: _ClassVar[int]
    SAY_FIELD_NUMBER: _ClassVar[int]
    PLAY_FIELD_NUMBER: _ClassVar[int]
    num_digits: int
    timeout: float
    finish_on_key: str
    say: Say
    play: Play
    def __init__(self, num_digits: _Optional[int] = ..., timeout: _Optional[float] = ..., finish_on_key: _Optional[str] = ..., say: _Optional[_Union[Say, _Mapping]] = ..., play: _Optional[_Union[Play, _Mapping]] = ...) -> None: ...

class Record(_message.Message):
    __slots__ = ("max_length", "silence", "finish_on_key", "beep", "trim")
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    SILENCE_FIELD_NUMBER: _ClassVar[int]
    FINISH_ON_KEY_FIELD_NUMBER: _ClassVar[int]
    BEEP_FIELD_NUMBER: _ClassVar[int]
    TRIM_FIELD_NUMBER: _ClassVar[int]
    max_length: float
    silence: float
    finish_on_key: str
    beep: bool
    trim: bool
    def __init__(self, max_length: _Optional[float] = ..., silence: _Optional[float] = ..., finish_on_key: _Optional[str] = ..., beep: _Optional[bool] = ..., trim: _Optional[bool] = ...) -> None: ...

class Dial(_message.Message):
    __slots__ = ("to", "timeout", "caller_id", "trunk", "time_limit", "resume")
    TO_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    CALLER_ID_FIELD_NUMBER: _ClassVar[int]
    TRUNK_FIELD_NUMBER: _ClassVar[int]
    TIME_LIMIT_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    to: str
    timeout: float
    caller_id: str
    trunk: str
    time_limit: float
    resume: _struct_pb2.Struct
    def __init__(self, to: _Optional[str] = ..., timeout: _Optional[float] = ..., caller_id: _Optional[str] = ..., trunk: _Optional[str] = ..., time_limit: _Optional[float] = ..., resume: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class Enqueue(_message.Message):
    __slots__ = ("queue", "priority")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    queue: str
    priority: int
    def __init__(self, queue: _Optional[str] = ..., priority: _Optional[int] = ...) -> None: ...

class JoinConference(_message.Message):
    __slots__ = ("name", "muted", "listen_only")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MUTED_FIELD_NUMBER: _ClassVar[int]
    LISTEN_ONLY_FIELD_NUMBER: _ClassVar[int]
    name: str
    muted: bool
    listen_only: bool
    def __init__(self, name: _Optional[str] = ..., muted: _Optional[bool] = ..., listen_only: _Optional[bool] = ...) -> None: ...

class SendDigits(_message.Message):
    __slots__ = ("digits", "duration_ms", "gap_ms")
    DIGITS_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    GAP_MS_FIELD_NUMBER: _ClassVar[int]
    digits: str
    duration_ms: int
    gap_ms: int
    def __init__(self, digits: _Optional[str] = ..., duration_ms: _Optional[int] = ..., gap_ms: _Optional[int] = ...) -> None: ...

class SetValue(_message.Message):
    __slots__ = ("key", "value")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: _struct_pb2.Value
    def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...

class Hangup(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class Transfer(_message.Message):
    __slots__ = ("target", "params")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    target: str
    params: _struct_pb2.Struct
    def __init__(self, target: _Optional[str] = ..., params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class Release(_message.Message):
    __slots__ = ("outlet", "params")
    OUTLET_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    outlet: str
    params: _struct_pb2.Struct
    def __init__(self, outlet: _Optional[str] = ..., params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class StopMedia(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EngineMessage(_message.Message):
    __slots__ = ("registered", "offer", "offer_withdrawn", "ack", "event", "pong")
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    OFFER_FIELD_NUMBER: _ClassVar[int]
    OFFER_WITHDRAWN_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    PONG_FIELD_NUMBER: _ClassVar[int]
    registered: Registered
    offer: Offer
    offer_withdrawn: OfferWithdrawn
    ack: Ack
    event: Event
    pong: Pong
    def __init__(self, registered: _Optional[_Union[Registered, _Mapping]] = ..., offer: _Optional[_Union[Offer, _Mapping]] = ..., offer_withdrawn: _Optional[_Union[OfferWithdrawn, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., event: _Optional[_Union[Event, _Mapping]] = ..., pong: _Optional[_Union[Pong, _Mapping]] = ...) -> None: ...

class Registered(_message.Message):
    __slots__ = ("process_id", "module_code", "vendor", "node_id", "offer_timeout_ms", "engine_version")
    PROCESS_ID_FIELD_NUMBER: _ClassVar[int]
    MODULE_CODE_FIELD_NUMBER: _ClassVar[int]
    VENDOR_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    OFFER_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    process_id: str
    module_code: str
    vendor: str
    node_id: str
    offer_timeout_ms: int
    engine_version: str
    def __init__(self, process_id: _Optional[str] = ..., module_code: _Optional[str] = ..., vendor: _Optional[str] = ..., node_id: _Optional[str] = ..., offer_timeout_ms: _Optional[int] = ..., engine_version: _Optional[str] = ...) -> None: ...

class Offer(_message.Message):
    __slots__ = ("offer_id", "session_id", "account", "module_code", "call_params", "module_params", "outlets", "events", "reason", "previous_module", "node", "app", "from_uri", "to_uri", "number", "direction", "answered", "deadline_ms", "resume")
    OFFER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    MODULE_CODE_FIELD_NUMBER: _ClassVar[int]
    CALL_PARAMS_FIELD_NUMBER: _ClassVar[int]
    MODULE_PARAMS_FIELD_NUMBER: _ClassVar[int]
    OUTLETS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_MODULE_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    APP_FIELD_NUMBER: _ClassVar[int]
    FROM_URI_FIELD_NUMBER: _ClassVar[int]
    TO_URI_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    ANSWERED_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    offer_id: str
    session_id: str
    account: str
    module_code: str
    call_params: _struct_pb2.Struct
    module_params: _struct_pb2.Struct
    outlets: _containers.RepeatedScalarFieldContainer[str]
    events: _containers.RepeatedScalarFieldContainer[str]
    reason: str
    previous_module: str
    node: str
    app: str
    from_uri: str
    to_uri: str
    number: str
    direction: str
    answered: bool
    deadline_ms: int
    resume: _struct_pb2.Struct
    def __init__(self, offer_id: _Optional[str] = ..., session_id: _Optional[str] = ..., account: _Optional[str] = ..., module_code: _Optional[str] = ..., call_params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., module_params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., outlets: _Optional[_Iterable[str]] = ..., events: _Optional[_Iterable[str]] = ..., reason: _Optional[str] = ..., previous_module: _Optional[str] = ..., node: _Optional[str] = ..., app: _Optional[str] = ..., from_uri: _Optional[str] = ..., to_uri: _Optional[str] = ..., number: _Optional[str] = ..., direction: _Optional[str] = ..., answered: _Optional[bool] = ..., deadline_ms: _Optional[int] = ..., resume: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class OfferWithdrawn(_message.Message):
    __slots__ = ("offer_id", "session_id", "reason")
    OFFER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    offer_id: str
    session_id: str
    reason: str
    def __init__(self, offer_id: _Optional[str] = ..., session_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("command_id", "session_id", "code", "message", "field", "result", "duplicate")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    session_id: str
    code: int
    message: str
    field: str
    result: _struct_pb2.Struct
    duplicate: bool
    def __init__(self, command_id: _Optional[str] = ..., session_id: _Optional[str] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., field: _Optional[str] = ..., result: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("session_id", "time_ns", "offer_id", "dtmf", "gather_result", "playback_finished", "recording_ready", "leg_answered", "leg_ended", "control_revoked", "cost_warning")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_NS_FIELD_NUMBER: _ClassVar[int]
    OFFER_ID_FIELD_NUMBER: _ClassVar[int]
    DTMF_FIELD_NUMBER: _ClassVar[int]
    GATHER_RESULT_FIELD_NUMBER: _ClassVar[int]
    PLAYBACK_FINISHED_FIELD_NUMBER: _ClassVar[int]
    RECORDING_READY_FIELD_NUMBER: _ClassVar[int]
    LEG_ANSWERED_FIELD_NUMBER: _ClassVar[int]
    LEG_ENDED_FIELD_NUMBER: _ClassVar[int]
    CONTROL_REVOKED_FIELD_NUMBER: _ClassVar[int]
    COST_WARNING_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    time_ns: int
    offer_id: str
    dtmf: Dtmf
    gather_result: GatherResult
    playback_finished: PlaybackFinished
    recording_ready: RecordingReady
    leg_answered: LegAnswered
    leg_ended: LegEnded
    control_revoked: ControlRevoked
    cost_warning: CostWarning
    def __init__(self, session_id: _Optional[str] = ..., time_ns: _Optional[int] = ..., offer_id: _Optional[str] = ..., dtmf: _Optional[_Union[Dtmf, _Mapping]] = ..., gather_result: _Optional[_Union[GatherResult, _Mapping]] = ..., playback_finished: _Optional[_Union[PlaybackFinished, _Mapping]] = ..., recording_ready: _Optional[_Union[RecordingReady, _Mapping]] = ..., leg_answered: _Optional[_Union[LegAnswered, _Mapping]] = ..., leg_ended: _Optional[_Union[LegEnded, _Mapping]] = ..., control_revoked: _Optional[_Union[ControlRevoked, _Mapping]] = ..., cost_warning: _Optional[_Union[CostWarning, _Mapping]] = ...) -> None: ...

class Dtmf(_message.Message):
    __slots__ = ("digit",)
    DIGIT_FIELD_NUMBER: _ClassVar[int]
    digit: str
    def __init__(self, digit: _Optional[str] = ...) -> None: ...

class GatherResult(_message.Message):
    __slots__ = ("command_id", "digits", "reason")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    DIGITS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    digits: str
    reason: str
    def __init__(self, command_id: _Optional[str] = ..., digits: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class PlaybackFinished(_message.Message):
    __slots__ = ("command_id", "interrupted")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    INTERRUPTED_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    interrupted: bool
    def __init__(self, command_id: _Optional[str] = ..., interrupted: _Optional[bool] = ...) -> None: ...

class RecordingReady(_message.Message):
    __slots__ = ("command_id", "path", "duration", "reason", "digits")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DIGITS_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    path: str
    duration: float
    reason: str
    digits: str
    def __init__(self, command_id: _Optional[str] = ..., path: _Optional[str] = ..., duration: _Optional[float] = ..., reason: _Optional[str] = ..., digits: _Optional[str] = ...) -> None: ...

class LegAnswered(_message.Message):
    __slots__ = ("leg",)
    LEG_FIELD_NUMBER: _ClassVar[int]
    leg: str
    def __init__(self, leg: _Optional[str] = ...) -> None: ...

class LegEnded(_message.Message):
    __slots__ = ("leg", "reason")
    LEG_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    leg: str
    reason: str
    def __init__(self, leg: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ControlRevoked(_message.Message):
    __slots__ = ("reason", "next_module", "by_vendor", "control_ms")
    REASON_FIELD_NUMBER: _ClassVar[int]
    NEXT_MODULE_FIELD_NUMBER: _ClassVar[int]
    BY_VENDOR_FIELD_NUMBER: _ClassVar[int]
    CONTROL_MS_FIELD_NUMBER: _ClassVar[int]
    reason: str
    next_module: str
    by_vendor: bool
    control_ms: int
    def __init__(self, reason: _Optional[str] = ..., next_module: _Optional[str] = ..., by_vendor: _Optional[bool] = ..., control_ms: _Optional[int] = ...) -> None: ...

class CostWarning(_message.Message):
    __slots__ = ("currency", "cost", "threshold")
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    currency: str
    cost: _billing_pb2.Money
    threshold: _billing_pb2.Money
    def __init__(self, currency: _Optional[str] = ..., cost: _Optional[_Union[_billing_pb2.Money, _Mapping]] = ..., threshold: _Optional[_Union[_billing_pb2.Money, _Mapping]] = ...) -> None: ...

class Pong(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: int
    def __init__(self, nonce: _Optional[int] = ...) -> None: ...
