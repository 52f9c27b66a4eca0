"""What the engine sends a vendor process, as plain typed Python objects."""
from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Union

from proto import pb

mh = pb.module_host_pb2


@dataclass(frozen=True)
class Ack:
    """A command's acknowledgement: `result` is what it produced, `duplicate` tells
    that the command id had been used before (the first Ack is repeated)."""

    command_id: str
    session_id: str
    result: dict = field(default_factory=dict)
    duplicate: bool = False


@dataclass(frozen=True)
class Say:
    """A prompt spoken with espeak-ng."""

    text: str
    voice: str = ""
    loop: int = 1


@dataclass(frozen=True)
class Play:
    """A prompt played from a WAV file path or http(s) URL on the engine's side."""

    url: str
    loop: int = 1


Prompt = Union[Say, Play]


@dataclass(frozen=True)
class Dtmf:
    digit: str


@dataclass(frozen=True)
class GatherResult:
    command_id: str
    digits: str
    reason: str   # num-digits, finish-key, timeout, stopped


@dataclass(frozen=True)
class PlaybackFinished:
    command_id: str
    interrupted: bool


@dataclass(frozen=True)
class RecordingReady:
    command_id: str
    path: str
    duration: float
    reason: str
    digits: str


@dataclass(frozen=True)
class LegAnswered:
    leg: str


@dataclass(frozen=True)
class LegEnded:
    leg: str
    reason: str


@dataclass(frozen=True)
class ControlRevoked:
    reason: str
    next_module: str
    by_vendor: bool
    control_ms: int


@dataclass(frozen=True)
class TextReceived:
    """A text on the session (docs/messaging.md): `frm` is the sender."""
    message_sid: str
    frm: str
    to: str
    body: str
    segments: int


@dataclass(frozen=True)
class MessageStatus:
    """The final status of a text sent with `Call.send_message`."""
    command_id: str
    message_sid: str
    status: str     # sent, delivered, undelivered, failed
    sip_code: int


MICRO = 1_000_000


def _decimal_text(micros: int) -> str:
    """Micro-units as the Billing API writes them: 23000 -> "0.023", 1000000 -> "1.00"."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICRO)
    digits = f"{frac:06d}".rstrip("0").ljust(2, "0")
    return f"{sign}{whole}.{digits}"


@dataclass(frozen=True)
class Money:
    """An exact amount, as `baton.v1.Money`: integer micro-units of `currency`
    (1 USD = 1,000,000) and the same as a decimal string. Never a float."""

    micros: int
    currency: str
    amount: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.micros, int) or isinstance(self.micros, bool):
            raise TypeError(f"Money.micros is an int of micro-units, not "
                            f"{type(self.micros).__name__}")
        if not self.amount:
            object.__setattr__(self, "amount", _decimal_text(self.micros))

    @property
    def decimal(self) -> Decimal:
        """The amount as an exact Decimal (micros / 1,000,000)."""
        return Decimal(self.micros).scaleb(-6)

    @classmethod
    def from_pb(cls, m: "pb.billing_pb2.Money", currency: str = "") -> "Money":
        return cls(m.micros, m.currency or currency, m.amount)

    def __str__(self) -> str:
        return f"{self.amount} {self.currency}".rstrip()


@dataclass(frozen=True)
class CostWarning:
    """The session's running cost (`cost`) crossed `threshold`, both exact `Money`."""

    cost: Money
    threshold: Money

    @property
    def currency(self) -> str:
        return self.cost.currency


Event = Union[Dtmf, GatherResult, PlaybackFinished, RecordingReady, LegAnswered, LegEnded,
              ControlRevoked, CostWarning, TextReceived, MessageStatus]


def event_from_pb(ev: "mh.Event") -> Event | None:
    """The typed event of an Event message (None for a kind this SDK does not know)."""
    kind = ev.WhichOneof("kind")
    if kind == "dtmf":
        return Dtmf(ev.dtmf.digit)
    if kind == "gather_result":
        g = ev.gather_result
        return GatherResult(g.command_id, g.digits, g.reason)
    if kind == "playback_finished":
        p = ev.playback_finished
        return PlaybackFinished(p.command_id, p.interrupted)
    if kind == "recording_ready":
        r = ev.recording_ready
        return RecordingReady(r.command_id, r.path, r.duration, r.reason, r.digits)
    if kind == "leg_answered":
        return LegAnswered(ev.leg_answered.leg)
    if kind == "leg_ended":
        return LegEnded(ev.leg_ended.leg, ev.leg_ended.reason)
    if kind == "control_revoked":
        c = ev.control_revoked
        return ControlRevoked(c.reason, c.next_module, c.by_vendor, c.control_ms)
    if kind == "text_received":
        t = ev.text_received
        return TextReceived(t.message_sid, getattr(t, "from"), t.to, t.body, t.segments)
    if kind == "message_status":
        m = ev.message_status
        return MessageStatus(m.command_id, m.message_sid, m.status, m.sip_code)
    if kind == "cost_warning":
        c = ev.cost_warning
        return CostWarning(Money.from_pb(c.cost, c.currency),
                           Money.from_pb(c.threshold, c.currency))
    return None


@dataclass
class OfferInfo:
    """The data of an offer (see `Offer` for what to do with one)."""

    offer_id: str
    session_id: str
    account: str
    module_code: str
    call_params: dict[str, Any]
    module_params: dict[str, Any]
    outlets: list[str]
    events: list[str]
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
    resume: dict[str, Any] | None

    @classmethod
    def from_pb(cls, o: "mh.Offer") -> "OfferInfo":
        return cls(o.offer_id, o.session_id, o.account, o.module_code,
                   pb.from_struct(o.call_params), pb.from_struct(o.module_params),
                   list(o.outlets), list(o.events), o.reason, o.previous_module, o.node, o.app,
                   o.from_uri, o.to_uri, o.number, o.direction, o.answered, o.deadline_ms,
                   pb.from_struct(o.resume) if o.HasField("resume") else None)
