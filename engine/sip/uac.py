"""The INVITE client: outbound call legs (RFC 3261 13.2, 9.1, 22.2).

An `OutgoingCall` sends an INVITE with an SDP offer, passes provisional
responses up, ACKs every final response (the transaction ACKs non-2xx, we
ACK 2xx and its retransmissions), answers digest challenges once, can be
cancelled, and becomes a UAC dialog when answered.
"""
from __future__ import annotations

import asyncio
import enum
import ipaddress
import logging
import secrets

from engine.sip import build, digest
from engine.sip.dialog import CONFIRMED, Dialog
from engine.sip.transaction import Flow, client_key
from engine.sip.uri import parse_uri, strip_brackets

log = logging.getLogger("baton.sip.uac")


class CallState(enum.IntEnum):
    CALLING = 1
    PROCEEDING = 2
    ANSWERED = 3
    FAILED = 4
    CANCELLED = 5
    ENDED = 6


class UacOwner:
    """What an outgoing call tells its owner. Every method is optional."""

    def call_trying(self, call: "OutgoingCall", msg) -> None:
        """The first 100 Trying (the next hop has the INVITE)."""

    def call_progress(self, call: "OutgoingCall", status: int, msg) -> None:
        """A provisional response (180 Ringing, 183 with early media SDP)."""

    def call_answered(self, call: "OutgoingCall", msg) -> None:
        """A 2xx arrived; `call.dialog` is confirmed and `msg.body` is the SDP answer."""

    def call_failed(self, call: "OutgoingCall", status: int, msg) -> None:
        """A final non-2xx (or 408 on timeout, 503 on transport failure, 487 when cancelled)."""


class OutgoingCall:
    __slots__ = ("core", "target", "from_uri", "to_uri", "sdp", "destination", "transport",
                 "credentials", "extra_headers", "max_forwards", "owner", "state", "call_id",
                 "local_tag", "cseq", "branch", "flow", "invite_data", "ct", "dialog",
                 "auth_tries", "cancel_requested", "got_provisional", "status", "via",
                 "contact")

    def __init__(self, core, target: str, *, from_uri: str, sdp: bytes, to_uri: str | None = None,
                 destination: tuple | None = None, transport: str | None = None,
                 credentials: tuple | None = None, headers=(), max_forwards: int = 70,
                 owner: UacOwner | None = None):
        self.core = core
        self.target = target
        self.from_uri = from_uri
        self.to_uri = to_uri or f"<{target}>"
        self.sdp = sdp
        self.destination = destination
        self.transport = transport
        self.credentials = credentials
        self.extra_headers = list(headers)
        self.max_forwards = max_forwards
        self.owner = owner or UacOwner()
        self.state = CallState.CALLING
        self.call_id = f"{secrets.token_hex(10)}@baton"
        self.local_tag = build.new_tag()
        self.cseq = 1
        self.branch = ""
        self.flow: Flow | None = None
        self.invite_data = b""
        self.ct = None
        self.dialog: Dialog | None = None
        self.auth_tries = 0
        self.cancel_requested = False
        self.got_provisional = False
        self.status = 0
        self.via = ""
        self.contact = ""

    # -- starting ---------------------------------------------------------------
    async def start(self) -> None:
        """Resolve the next hop and send the INVITE."""
        try:
            self.flow = await open_flow(self.core, self.target, self.destination, self.transport)
        except (OSError, ValueError) as exc:
            log.info("call to %s: no route: %s", self.target, exc)
            self._fail(503 if isinstance(exc, OSError) else 416, None)
            return
        self.contact = self.core.contact_for(self.flow)
        self._send_invite()

    def _send_invite(self, authorization: tuple | None = None) -> None:
        core = self.core
        self.branch = build.new_branch()
        self.via = (f"SIP/2.0/{self.flow.transport.name} {core.sent_by(self.flow)}"
                    f";branch={self.branch};rport")
        h = [("via", self.via), ("max-forwards", str(self.max_forwards)),
             ("from", f"{self.from_uri};tag={self.local_tag}"), ("to", self.to_uri),
             ("call-id", self.call_id), ("cseq", f"{self.cseq} INVITE"),
             ("contact", self.contact), ("allow", build.ALLOW)]
        if authorization is not None:
            h.append(authorization)
        h += self.extra_headers
        if core.user_agent:
            h.append(("user-agent", core.user_agent))
        if self.sdp:
            h.append(("content-type", "application/sdp"))
        self.invite_data = build.request("INVITE", self.target, h, self.sdp)
        core.stats["sent_INVITE"] += 1
        self.ct = core.transactions.new_client(
            client_key(self.branch, "INVITE"), self.flow, self.invite_data, True,
            self._on_response, self._make_ack)

    # -- responses --------------------------------------------------------------
    def _on_response(self, ct, msg) -> None:
        if ct is not self.ct:
            return
        if msg is None:
            # RFC 3261 8.1.3.1: a timeout or transport error counts as 408 / 503.
            if self.state in (CallState.CALLING, CallState.PROCEEDING):
                self._fail(408 if not self.cancel_requested else 487, None)
            return
        status = msg.status
        if status < 200:
            if status == 100:
                if not self.got_provisional:
                    trying = getattr(self.owner, "call_trying", None)
                    if trying is not None:
                        trying(self, msg)
                self.got_provisional = True
            else:
                self.got_provisional = True
                if self.state == CallState.CALLING:
                    self.state = CallState.PROCEEDING
                self.owner.call_progress(self, status, msg)
            if self.cancel_requested:
                self._send_cancel()
            return
        if status < 300:
            self._on_2xx(msg)
            return
        self.status = status
        if status in (401, 407) and self.credentials and self.auth_tries == 0 \
                and not self.cancel_requested:
            header = answer_challenge(msg, "INVITE", self.target, self.credentials, self.sdp)
            if header is not None:
                # RFC 3261 22.2: retry with credentials, same Call-ID, CSeq + 1.
                self.auth_tries += 1
                self.cseq += 1
                self._send_invite(header)
                return
        if self.cancel_requested and status == 487:
            self.state = CallState.CANCELLED
            self.owner.call_failed(self, 487, msg)
            return
        self._fail(status, msg)

    def _make_ack(self, msg) -> bytes:
        """RFC 3261 17.1.1.3: the ACK for a non-2xx reuses the INVITE's branch."""
        to = msg.get("to", self.to_uri)
        h = [("via", self.via), ("max-forwards", str(self.max_forwards)),
             ("from", f"{self.from_uri};tag={self.local_tag}"), ("to", to),
             ("call-id", self.call_id), ("cseq", f"{self.cseq} ACK")]
        return build.request("ACK", self.target, h)

    def _on_2xx(self, msg) -> None:
        d = self.dialog
        if d is None:
            if self.state not in (CallState.CALLING, CallState.PROCEEDING) and \
                    self.state != CallState.CANCELLED:
                return
            contact = msg.headers.get("contact")
            rr = msg.headers.get("record-route", [])
            # RFC 3261 12.1.2: the UAC route set is the Record-Route list reversed.
            d = Dialog(self.core, self.call_id, self.local_tag, msg.to_tag or "",
                       self.from_uri, msg.get("to", self.to_uri),
                       strip_brackets(contact[0]) if contact else self.target,
                       list(reversed(rr)), self.flow, False)
            d.local_cseq = self.cseq
            d.state = CONFIRMED
            d.local_sdp = self.sdp
            d.remote_sdp = msg.body
            self.dialog = d
            self.core.dialogs[d.key] = d
        self._send_ack(d)
        if self.state == CallState.CANCELLED or self.cancel_requested:
            # RFC 3261 9.1: the CANCEL lost the race; end the call with BYE.
            self.state = CallState.ENDED
            d.bye(reason="cancel")
            return
        if self.state != CallState.ANSWERED:
            self.state = CallState.ANSWERED
            self.status = msg.status
            self.owner.call_answered(self, msg)

    def _send_ack(self, d: Dialog) -> None:
        # RFC 3261 13.2.2.4: the ACK for a 2xx is its own transaction, sent to the remote target.
        branch = build.new_branch()
        via = f"SIP/2.0/{self.flow.transport.name} {self.core.sent_by(self.flow)};branch={branch};rport"
        h = [("via", via), ("max-forwards", "70")]
        for r in d.route_set:
            h.append(("route", r))
        h += [("from", f"{self.from_uri};tag={self.local_tag}"),
              ("to", f"{d.remote_uri}" if ";tag=" in d.remote_uri else f"{d.remote_uri};tag={d.remote_tag}"),
              ("call-id", self.call_id), ("cseq", f"{self.cseq} ACK")]
        self.flow.send_or_drop(build.request("ACK", d.remote_target or self.target, h))

    # -- ending -----------------------------------------------------------------
    def cancel(self) -> None:
        """Give up on an unanswered call (RFC 3261 9.1); a no-op once answered."""
        if self.state not in (CallState.CALLING, CallState.PROCEEDING):
            return
        self.cancel_requested = True
        if self.got_provisional:
            self._send_cancel()

    def _send_cancel(self) -> None:
        if self.ct is None or self.cancel_requested == "sent":
            return
        h = [("via", self.via), ("max-forwards", str(self.max_forwards)),
             ("from", f"{self.from_uri};tag={self.local_tag}"), ("to", self.to_uri),
             ("call-id", self.call_id), ("cseq", f"{self.cseq} CANCEL")]
        data = build.request("CANCEL", self.target, h)
        self.core.stats["sent_CANCEL"] += 1
        self.core.transactions.new_client(client_key(self.branch, "CANCEL"), self.flow, data,
                                          False, _ignore)
        self.cancel_requested = "sent"

    def hangup(self) -> None:
        """Cancel if unanswered, BYE if answered."""
        if self.state == CallState.ANSWERED and self.dialog is not None:
            self.state = CallState.ENDED
            self.dialog.bye()
        else:
            self.cancel()

    def _fail(self, status: int, msg) -> None:
        self.state = CallState.FAILED
        self.status = status
        self.owner.call_failed(self, status, msg)


def answer_challenge(msg, method: str, target: str, credentials: tuple,
                     body: bytes = b"") -> tuple[str, str] | None:
    """The (Authorization or Proxy-Authorization, value) header answering the
    digest challenge of a 401/407 `msg`, or None when it cannot be answered."""
    status = msg.status
    challenges = msg.get_all("www-authenticate" if status == 401 else "proxy-authenticate")
    try:
        challenge = digest.choose_challenge(challenges)
        user, password = credentials
        value = digest.authorize(challenge, method, target, user, password, body=body)
    except ValueError as exc:
        log.info("%s to %s: cannot answer challenge: %s", method, target, exc)
        return None
    return ("authorization" if status == 401 else "proxy-authorization", value)


async def next_hop(target: str, destination: tuple | None = None,
                   transport: str | None = None) -> tuple[str, int, str]:
    """(host, port, UDP|TCP) a request to `target` goes to: `destination` when
    given, else the URI's host and port (RFC 3263 simplified: its address
    record, default port 5060). Raises ValueError for what cannot be reached."""
    if destination is not None:
        host, port = destination
        transport = (transport or "UDP").upper()
    else:
        uri = parse_uri(target)
        if uri.scheme == "tel":
            raise ValueError("a tel: URI needs a trunk to reach it")
        host, port = uri.host.strip("[]"), uri.port or 5060
        transport = (transport or uri.transport).upper()
    if transport not in ("UDP", "TCP"):
        raise ValueError(f"transport {transport} is not supported")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=2)
        host = infos[0][4][0]
    return host, port, transport


async def open_flow(core, target: str, destination: tuple | None = None,
                    transport: str | None = None) -> Flow:
    """The flow a new request to `target` leaves on (OSError: no transport for it)."""
    host, port, transport = await next_hop(target, destination, transport)
    if transport == "TCP":
        if not core.tcp:
            raise OSError("no TCP transport")
        return core.tcp[0].flow_to((host, port))
    if not core.udp:
        raise OSError("no UDP transport")
    return Flow(core.udp[0], (host, port))


def _ignore(ct, msg) -> None:
    return None
