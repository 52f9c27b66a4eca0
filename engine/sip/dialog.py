"""SIP dialogs (RFC 3261 12-15): the UAS side of a call leg, and UAC requests inside it."""
from __future__ import annotations

import enum
import logging

from engine.sip import build
from engine.sip.timers import T1, T2, TIMER_64T1
from engine.sip.transaction import Flow, client_key
from engine.sip.uri import strip_brackets

log = logging.getLogger("baton.sip.dialog")


class DialogState(enum.IntEnum):
    EARLY = 1       # INVITE received, no final response yet
    CONFIRMED = 2   # 2xx sent (UAS) or received (UAC)
    TERMINATED = 3


EARLY = DialogState.EARLY
CONFIRMED = DialogState.CONFIRMED
TERMINATED = DialogState.TERMINATED


class DialogOwner:
    """What a dialog tells its owner (a call leg). Every method is optional."""

    def dialog_confirmed(self, dialog: "Dialog") -> None:
        """The ACK for our 2xx arrived (with the SDP answer, for a late offer)."""

    def dialog_terminated(self, dialog: "Dialog", reason: str) -> None:
        """The dialog ended: `bye`, `cancel`, `ack-timeout`, `rejected`, `local-bye`, `error`."""

    def dialog_reoffer(self, dialog: "Dialog", body: bytes) -> bytes:
        """A re-INVITE or UPDATE with an SDP offer: return the SDP answer.
        Raise SdpError to refuse it with 488."""
        raise NotImplementedError

    def dialog_request(self, dialog: "Dialog", msg) -> int:
        """Any other in-dialog request (INFO, ...): return the status to answer."""
        return 200


class Dialog:
    """One dialog. As UAS it is created by an initial INVITE and answers it.

    Invariant: `key` is (Call-ID, local tag, remote tag) and the dialog is in
    `core.dialogs` under it from the moment its tag is chosen until it is
    TERMINATED.
    """

    __slots__ = ("core", "call_id", "local_tag", "remote_tag", "key", "state", "is_uas",
                 "local_uri", "remote_uri", "remote_target", "route_set", "local_cseq",
                 "remote_cseq", "flow", "invite", "invite_st", "source", "owner",
                 "ok_data", "ok_gen", "ok_interval", "ok_elapsed", "local_sdp",
                 "remote_sdp", "session", "reinvite_pending", "__weakref__")

    def __init__(self, core, call_id: str, local_tag: str, remote_tag: str, local_uri: str,
                 remote_uri: str, remote_target: str | None, route_set: list, flow: Flow,
                 is_uas: bool):
        self.core = core
        self.call_id = call_id
        self.local_tag = local_tag
        self.remote_tag = remote_tag
        self.key = (call_id, local_tag, remote_tag)
        self.state = EARLY
        self.is_uas = is_uas
        self.local_uri = local_uri
        self.remote_uri = remote_uri
        self.remote_target = remote_target
        self.route_set = route_set
        self.local_cseq = 100
        self.remote_cseq = 0
        self.flow = flow
        self.source = flow.addr
        self.invite = None
        self.invite_st = None
        self.owner: DialogOwner | None = None
        self.ok_data = None
        self.ok_gen = 0
        self.ok_interval = T1
        self.ok_elapsed = 0.0
        self.local_sdp = b""
        self.remote_sdp = b""
        self.session = None
        self.reinvite_pending = False

    @classmethod
    def from_invite(cls, core, msg, flow: Flow, st) -> "Dialog":
        """The UAS dialog of an initial INVITE (RFC 3261 12.1.1), still early."""
        h = msg.headers
        contact = h.get("contact")
        # RFC 3261 12.1.1: the UAS route set is the Record-Route list, in order.
        d = cls(core, msg.call_id, build.new_tag(), msg.from_tag or "", h["to"][0],
                h["from"][0], strip_brackets(contact[0]) if contact else None,
                h.get("record-route", []), flow, True)
        d.remote_cseq = msg.cseq
        d.invite = msg
        d.invite_st = st
        d.remote_sdp = msg.body
        return d

    # -- UAS responses to the initial INVITE ---------------------------------
    def provisional(self, status: int = 180, body: bytes = b"") -> None:
        if self.state != EARLY:
            return
        headers = [("contact", self.core.contact_for(self.flow))]
        if body:
            headers.append(("content-type", "application/sdp"))
        data = build.response(self.invite, status, self.source, self.local_tag,
                              headers=headers, body=body, server=self.core.user_agent,
                              via_params=self.core.overload.via_params(self.invite))
        self.core.stats[build.sent_key(status)] += 1
        self.invite_st.respond(status, data)

    def answer(self, sdp: bytes) -> None:
        """200 OK with our SDP; retransmitted until the ACK arrives (RFC 3261 13.3.1.4)."""
        if self.state != EARLY:
            return
        self.local_sdp = sdp
        headers = [("contact", self.core.contact_for(self.flow)),
                   ("allow", build.ALLOW)]
        rr = self.invite.headers.get("record-route")
        if rr:
            headers[:0] = [("record-route", v) for v in rr]
        if sdp:
            headers.append(("content-type", "application/sdp"))
        data = build.response(self.invite, 200, self.source, self.local_tag,
                              headers=headers, body=sdp, server=self.core.user_agent,
                              via_params=self.core.overload.via_params(self.invite))
        self.state = CONFIRMED
        if self.is_uas:
            self.core.overload.setup_ended()
        self.ok_data = data
        self.core.stats["sent_200"] += 1
        self.invite_st.respond(200, data)
        self.invite_st = None
        if not self.flow.reliable:
            self.ok_gen += 1
            self.ok_interval = T1
            self.ok_elapsed = 0.0
            self.core.timers.arm_method(T1, Dialog._retransmit_ok, self, self.ok_gen)
        else:
            self.ok_gen += 1
            self.core.timers.arm(TIMER_64T1, self._ack_timeout, self.ok_gen)

    def reject(self, status: int, reason: str | None = None, headers=(),
               why: str = "rejected") -> None:
        if self.state != EARLY:
            return
        data = build.response(self.invite, status, self.source, self.local_tag,
                              reason=reason, headers=headers, server=self.core.user_agent,
                              via_params=self.core.overload.via_params(self.invite))
        self.core.stats[build.sent_key(status)] += 1
        self.invite_st.respond(status, data)
        self._terminate(why)

    # -- 2xx retransmission (RFC 3261 13.3.1.4) -------------------------------
    def _retransmit_ok(self, gen: int) -> None:
        if gen != self.ok_gen or self.ok_data is None or self.state != CONFIRMED:
            return
        self.ok_elapsed += self.ok_interval
        if self.ok_elapsed >= TIMER_64T1:
            self._ack_timeout(gen)
            return
        self.flow.send_or_drop(self.ok_data)
        self.ok_interval = min(self.ok_interval * 2, T2)
        self.core.timers.arm_method(self.ok_interval, Dialog._retransmit_ok, self, gen)

    def _ack_timeout(self, gen: int) -> None:
        if gen != self.ok_gen or self.ok_data is None or self.state != CONFIRMED:
            return
        # RFC 3261 13.3.1.4: no ACK within 64*T1 -> confirm and end the dialog with BYE.
        self.ok_data = None
        log.info("no ACK for 2xx on %s; sending BYE", self.call_id)
        self.bye(reason="ack-timeout")

    def on_ack(self, msg) -> None:
        if self.ok_data is None:
            return  # retransmitted ACK
        self.ok_data = None
        self.ok_gen += 1
        self.invite = None
        if msg.body and not self.remote_sdp:
            self.remote_sdp = msg.body  # RFC 3264 late offer: the answer is in the ACK
        owner = self.owner
        if owner is not None:
            owner.dialog_confirmed(self)

    # -- requests inside the dialog -------------------------------------------
    def request(self, method: str, body: bytes = b"", headers=(), on_response=None) -> None:
        """Send a request inside this dialog (RFC 3261 12.2.1.1)."""
        self.local_cseq += 1
        branch = build.new_branch()
        core = self.core
        via = f"SIP/2.0/{self.flow.transport.name} {core.sent_by(self.flow)};branch={branch};rport"
        target = self.remote_target or strip_brackets(self.remote_uri)
        h = [("via", via), ("max-forwards", "70")]
        for r in self.route_set:
            h.append(("route", r))
        h += [("from", _with_tag(self.local_uri, self.local_tag)),
              ("to", _with_tag(self.remote_uri, self.remote_tag))]
        h += [("call-id", self.call_id), ("cseq", f"{self.local_cseq} {method}")]
        h += list(headers)
        if core.user_agent:
            h.append(("user-agent", core.user_agent))
        if body:
            h.append(("content-type", "application/sdp"))
        data = build.request(method, target, h, body)
        cb = on_response or _ignore_response
        core.stats[f"sent_{method}"] += 1
        core.transactions.new_client(client_key(branch, method), self.flow, data,
                                     method == "INVITE", cb)

    def bye(self, reason: str = "local-bye") -> None:
        """End the call from our side: BYE, then the dialog is gone (RFC 3261 15.1.1)."""
        if self.state == TERMINATED:
            return
        if self.state == EARLY:
            self.reject(487 if reason == "cancel" else 480, why=reason)
            return
        self.request("BYE")
        self._terminate(reason)

    def _terminate(self, reason: str) -> None:
        if self.state == TERMINATED:
            return
        if self.state == EARLY and self.is_uas:
            self.core.overload.setup_ended()
        self.state = TERMINATED
        self.ok_gen += 1
        self.ok_data = None
        self.invite = None
        core = self.core
        if core.dialogs.get(self.key) is self:
            del core.dialogs[self.key]
        owner = self.owner
        self.owner = None
        if owner is not None:
            owner.dialog_terminated(self, reason)


def _with_tag(addr: str, tag: str) -> str:
    if not tag or ";tag=" in addr:
        return addr
    return f"{addr};tag={tag}"


def _ignore_response(ct, msg) -> None:
    return None
