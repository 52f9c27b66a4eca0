"""Texts on the sessions a vendor process holds (docs/messaging.md, docs/vendors.md).

The module in control of a conversation (or of a call that gets a MESSAGE in its
dialog) gets each text; a vendor module passes it to the process that took the
session as a `TextReceived` event, keeping the texts that arrive between the offer
and the Take (the one that moved the conversation here among them) until then.
`SendMessage` sends a text through the engine's messaging, checked like a dial,
acknowledged at once and followed by a `MessageStatus` event at its final status.
"""
from __future__ import annotations

import collections

from engine.sip.uri import check_user_part
from proto import pb

mh = pb.module_host_pb2

PENDING = 32        # texts kept for a session offered but not yet taken


def received(m) -> "mh.Event":
    """The `TextReceived` event of a TextMessage (without session and offer ids)."""
    return mh.Event(text_received=mh.TextReceived(
        message_sid=m.sid, to=m.to, body=m.body, segments=m.segments,
        **{"from": m.frm}))


def keep(state, m) -> None:
    if state.texts is None:
        state.texts = collections.deque(maxlen=PENDING)
    state.texts.append(m)


def flush(state) -> list:
    texts = list(state.texts or ())
    state.texts = None
    return texts


def check(engine, cmd, invalid) -> tuple[str, str | None, str | None]:
    """(body, to, from) of a SendMessage, or `invalid(field, why)` raised."""
    s = cmd.send_message
    if not s.body:
        raise invalid("send_message.body", "a text is required")
    limit = int((engine.cfg.messaging or {}).get("max_bytes", 4096))
    if len(s.body.encode("utf-8")) > limit:
        raise invalid("send_message.body", f"longer than {limit} bytes")
    to = s.to.strip() or None
    if to is not None and any(ord(ch) < 0x21 or ch in '<>"\x7f' for ch in to):
        raise invalid("send_message.to", "not a number or SIP URI")
    frm = getattr(s, "from").strip() or None
    if frm is not None:
        try:
            check_user_part(frm, "send_message.from")
        except ValueError as exc:
            raise invalid("send_message.from", str(exc)) from None
    return s.body, to, frm


def status_event(command_id: str, m) -> "mh.Event":
    return mh.Event(message_status=mh.MessageStatus(
        command_id=command_id, message_sid=m.sid, status=m.status, sip_code=m.sip_code))
