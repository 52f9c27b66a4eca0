"""The SIP core: the UAS/UAC logic above the transactions (RFC 3261 8, 12-16).

It validates requests in the RFC's order (method, headers, content), keeps
the dialog table, and hands new calls to the application through one call:
`app.on_invite(dialog)`. The application answers or rejects the dialog.
"""
from __future__ import annotations

import asyncio
import collections
import socket
import logging

from engine.sip import build
from engine.sip.dialog import CONFIRMED, EARLY, Dialog
from engine.sip.errors import SipError
from ext.sip_message import SipParseError
from ext.kernels import sip as _sip_kernel
_initial_invite = _sip_kernel.initial_invite
from ext.sip_py import parse_name_addr
from engine.sip.overload import Overload, OverloadLimits
from engine.sip.timers import TimerQueues
from engine.sip.transaction import (ACCEPTED, PROCEEDING, Flow, TransactionLayer, client_key,
                          server_key)
from engine.common.net import format_hostport
from engine.sip.transport import TcpLimits, TcpTransport, UdpTransport
from engine.sip.uri import SUPPORTED_SCHEMES, check_uri_text, strip_brackets

log = logging.getLogger("baton.sip")

KNOWN_METHODS = frozenset(("INVITE", "ACK", "CANCEL", "BYE", "OPTIONS", "REGISTER",
                           "INFO", "UPDATE", "PRACK", "SUBSCRIBE", "NOTIFY", "REFER",
                           "MESSAGE", "PUBLISH"))
# Methods we implement; the other known ones get 405 with Allow, unknown ones 501.
IMPLEMENTED = frozenset(("INVITE", "ACK", "CANCEL", "BYE", "OPTIONS", "REGISTER",
                         "INFO", "UPDATE", "MESSAGE"))
SUPPORTED_OPTIONS: frozenset = frozenset()  # every Require tag gets 420 (RFC 3261 8.2.2.3)
SDP_TYPES = ("application/sdp",)
HOUSEKEEPING = 10.0     # seconds between sweeps of idle connections and expired bindings
ACCEPT_OK = ("application/sdp", "application/*", "*/*")
UDP_RCVBUF = 4 << 20    # octets asked for each SIP/UDP socket's receive buffer (SO_RCVBUF)


def content_type_of(msg) -> str:
    ct = msg.get("content-type")
    if not ct:
        return ""
    return ct.split(";", 1)[0].strip().lower()


class SipCore:
    """One SIP user agent core over any number of UDP/TCP listeners."""

    def __init__(self, app, *, advertise: str | None = None, user_agent: str = "Baton",
                 registrar=None, tcp_limits: TcpLimits | None = None,
                 overload: OverloadLimits | None = None, udp_rcvbuf: int = UDP_RCVBUF):
        self.app = app
        self.overload = Overload(overload)
        self.udp_rcvbuf = udp_rcvbuf
        self.tcp_limits = tcp_limits or TcpLimits()
        self._housekeeping = None
        self.advertise = advertise
        self.user_agent = user_agent
        self.registrar = registrar
        self.timers = TimerQueues()
        self.transactions = TransactionLayer(self.timers)
        self.dialogs: dict[tuple, Dialog] = {}
        self.udp: list[UdpTransport] = []
        self.tcp: list[TcpTransport] = []
        self.stats = collections.Counter()
        # Requests received by method and responses received by status (for /metrics).
        self.rx_methods = collections.Counter()
        self.rx_statuses = collections.Counter()
        self.draining = False
        self._contact = {}
        self._sent_by = {}

    # -- lifecycle ------------------------------------------------------------
    async def listen(self, host: str, port: int, transports=("udp", "tcp")) -> int:
        """Bind UDP and/or TCP on host:port (port 0: pick one free for both)."""
        loop = asyncio.get_running_loop()
        if not self.timers._handle:
            self.timers.start(loop)
        self.overload.start(loop)
        if self._housekeeping is None:
            self._housekeeping = loop.call_later(self._housekeeping_interval(), self._tidy)
        tries = 20 if port == 0 else 1
        for attempt in range(tries):
            usock = tcp = None
            try:
                # UDP is bound first (to learn the port) but only starts reading once
                # TCP listens too: nothing is answered until every transport is up.
                if "udp" in transports:
                    usock = self._bind_udp(host, port)
                    port = usock.getsockname()[1]
                if "tcp" in transports:
                    tcp = TcpTransport(self, self.tcp_limits)
                    await tcp.listen(host, port)
                    port = tcp.local[1]
            except OSError:
                # The UDP port picked for us may be taken for TCP: try another pair.
                if usock is not None:
                    usock.close()
                if attempt + 1 >= tries:
                    raise
                port = 0
                continue
            if tcp is not None:
                self.tcp.append(tcp)
            if usock is not None:
                udp = UdpTransport(self, usock)
                if not udp.start(loop):
                    _, udp = await loop.create_datagram_endpoint(
                        lambda: UdpTransport(self, usock), sock=usock)
                self.udp.append(udp)
            return port
        raise OSError("no free port")

    @staticmethod
    def _bind_udp(host: str, port: int) -> socket.socket:
        # No SO_REUSEADDR: on UDP it would let a second engine bind the same port and
        # share its datagrams (UDP has no TIME_WAIT to wait out).
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        return sock

    def _housekeeping_interval(self) -> float:
        # Often enough that an idle connection outlives its timeout by a quarter at most.
        return min(HOUSEKEEPING, self.tcp_limits.idle_timeout / 4)

    def _tidy(self) -> None:
        """Close idle TCP connections and purge expired registrations, on a timer."""
        loop = asyncio.get_running_loop()
        try:
            for t in self.tcp:
                self.stats["tcp_idle_closed"] += t.close_idle(loop.time())
            if self.registrar is not None:
                self.registrar.purge()
        finally:
            self._housekeeping = loop.call_later(self._housekeeping_interval(), self._tidy)

    def close(self) -> None:
        self.timers.stop()
        self.overload.stop()
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            self._housekeeping = None
        for t in self.udp:
            t.close()
        for t in self.tcp:
            t.close()

    async def drain(self, timeout: float = 3.0) -> None:
        """Graceful stop: refuse new calls (503), end calls in progress with BYE,
        wait for the BYE transactions to finish."""
        self.draining = True
        for d in list(self.dialogs.values()):
            try:
                if d.state == EARLY:
                    d.reject(503, headers=[("retry-after", "30")], why="shutdown")
                else:
                    d.bye(reason="shutdown")
            except (SipError, OSError) as exc:
                # One dialog that cannot be ended cleanly must not stop the others.
                log.warning("drain: dialog %s not ended cleanly: %s", d.call_id, exc)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.pending_requests() and loop.time() < deadline:
            await asyncio.sleep(0.02)

    def pending_requests(self) -> int:
        """Client transactions still waiting for a final response."""
        return sum(1 for ct in self.transactions.client.values() if ct.state < ACCEPTED)

    # -- addressing -----------------------------------------------------------
    def _local_of(self, flow: Flow):
        t = flow.transport
        listener = getattr(t, "listener", None)
        return (listener or t).local

    def sent_by(self, flow: Flow) -> str:
        t = flow.transport
        v = self._sent_by.get(id(getattr(t, "listener", None) or t))
        if v is None:
            host, port = self._local_of(flow)
            v = format_hostport(self.advertise or host, port)
            self._sent_by[id(getattr(t, "listener", None) or t)] = v
        return v

    def contact_for(self, flow: Flow) -> str:
        t = flow.transport
        key = id(getattr(t, "listener", None) or t)
        c = self._contact.get(key)
        if c is None:
            suffix = ";transport=tcp" if t.name == "TCP" else ""
            c = f"<sip:baton@{self.sent_by(flow)}{suffix}>"
            self._contact[key] = c
        return c

    @staticmethod
    def response_flow(msg, flow: Flow) -> Flow:
        """RFC 3261 18.2.2 / RFC 3581: where the response to `msg` goes.

        Always the source IP of the request; the port from the top Via unless
        rport was asked for. Never a host named in the message."""
        if flow.reliable or msg.via_rport is not None or not msg.via_host:
            return flow
        port = msg.via_port or 5060
        if port == flow.addr[1]:
            return flow
        return Flow(flow.transport, (flow.addr[0], port))

    # -- input ----------------------------------------------------------------
    def on_message(self, data: bytes, flow: Flow, stream: bool) -> None:
        ov = self.overload
        # Overload: a new INVITE or MESSAGE is refused before any transaction, dialog or
        # session exists; the raw octets tell which datagrams need the check at all.
        check = (ov.active or ov.refusals) and (_initial_invite(data)
                                                or data.startswith(b"MESSAGE "))
        try:
            msg = _sip_kernel.parse_message(data, stream)
        except SipParseError as exc:
            # RFC 4475 3.1.2: nothing goes back to an unparseable message's sender.
            self.stats["parse_errors"] += 1
            log.debug("dropped unparseable message from %s: %s", flow.addr, exc)
            return
        if check and self._refuse_for_overload(msg, flow):
            return
        try:
            if msg.is_request:
                self.on_request(msg, flow)
            else:
                self.on_response(msg, flow)
        except Exception:
            self.stats["internal_errors"] += 1
            log.exception("failed to process %r from %s", msg, flow.addr)
            if msg.is_request and msg.method != "ACK":
                try:
                    self.stateless(msg, flow, 500)
                except Exception:
                    log.exception("could not answer 500")

    def _refuse_for_overload(self, msg, flow: Flow) -> bool:
        """Answer a new INVITE, or a MESSAGE outside any dialog, 503 + Retry-After
        statelessly (RFC 3261 21.5.4) if the engine is overloaded or refused it already (a
        retransmission: the same 503 again, no new work). False: the request goes its
        ordinary way."""
        method = msg.method
        if msg.error is not None or msg.to_tag is not None or msg.version != "SIP/2.0" \
                or method not in ("INVITE", "MESSAGE"):
            return False
        key = server_key(msg)
        layer = self.transactions
        if key in layer.server or key in layer.lingering:
            return False  # a retransmission of a call accepted before the overload
        ov = self.overload
        rflow = self.response_flow(msg, flow)
        data = ov.remembered(key)
        if data is None:
            if not ov.active or ov.admit():
                return False
            to = msg.get("to")
            tag = None if to is not None and parse_name_addr(to) is None else build.new_tag()
            data = build.response(msg, 503, flow.addr, tag,
                                  headers=[("retry-after", str(ov.limits.retry_after))],
                                  server=self.user_agent, via_params=ov.via_params(msg))
            ov.remember(key, data, method)
            self.stats["sent_503"] += 1
        self.stats["requests"] += 1
        self.rx_methods[method] += 1
        rflow.send_or_drop(data)
        return True

    def stateless(self, msg, flow: Flow, status: int, reason=None, headers=()) -> None:
        rflow = self.response_flow(msg, flow)
        self.stats[build.sent_key(status)] += 1
        # A To header we could not parse is echoed as it came, without a tag
        # that would land inside its broken quoting (RFC 4475 3.1.2.6).
        to = msg.get("to")
        tag = None if to is not None and parse_name_addr(to) is None else build.new_tag()
        rflow.send_or_drop(build.response(msg, status, flow.addr, tag, reason=reason,
                                  headers=headers, server=self.user_agent,
                                  via_params=self.overload.via_params(msg)))

    def respond(self, st, msg, status: int, reason=None, headers=(), body=b"",
                to_tag: str | None = None) -> None:
        """Answer `msg` through its server transaction `st`."""
        self.stats[build.sent_key(status)] += 1
        if to_tag is None and status > 100:
            to_tag = build.new_tag()
        st.respond(status, build.response(msg, status, st.flow.addr, to_tag, reason=reason,
                                          headers=headers, body=body, server=self.user_agent,
                                          via_params=self.overload.via_params(msg)))

    def on_request(self, msg, flow: Flow) -> None:
        method = msg.method
        self.stats["requests"] += 1
        self.rx_methods[method if method in KNOWN_METHODS else "other"] += 1
        if msg.error is not None:
            if method != "ACK":
                status, reason = msg.error
                self.stateless(msg, flow, status, reason=reason)
            return
        if msg.version != "SIP/2.0":
            if method != "ACK":
                self.stateless(msg, flow, 505)  # RFC 3261 8.2 / RFC 4475 3.1.2.16
            return
        key = server_key(msg)
        layer = self.transactions
        st = layer.server.get(key)
        if st is not None:
            st.on_request(msg)  # RFC 3261 17.2.3: a retransmission (or the ACK of a non-2xx)
            return
        if method == "ACK":
            self.on_ack(msg)
            return
        if key in layer.lingering:
            layer.absorb(key, msg)  # answered already: its final response again, or nothing
            return
        rflow = self.response_flow(msg, flow)
        if method == "CANCEL":
            self.on_cancel(msg, rflow, key)
            return
        st = layer.new_server(key, msg, rflow)
        # RFC 3261 8.2.1: method inspection.
        if method not in IMPLEMENTED:
            status = 405 if method in KNOWN_METHODS else 501
            self.respond(st, msg, status, headers=[("allow", build.ALLOW)])
            return
        # RFC 3261 8.2.2.1: the Request-URI scheme.
        scheme = msg.uri.partition(":")[0].lower()
        if scheme not in SUPPORTED_SCHEMES:
            self.respond(st, msg, 416)
            return
        # RFC 3261 8.2.2.3: Require with option tags we do not support.
        req = msg.headers.get("require")
        if req and method != "ACK":
            unsupported = [t for t in req if t.lower() not in SUPPORTED_OPTIONS]
            if unsupported:
                self.respond(st, msg, 420, headers=[("unsupported", ", ".join(unsupported))])
                return
        # RFC 3261 8.2.3: content we cannot process.
        if msg.body and method in ("INVITE", "UPDATE"):
            enc = msg.get("content-encoding")
            if enc and enc.lower() != "identity":
                self.respond(st, msg, 415, headers=[("accept-encoding", "identity")])
                return
            ct = content_type_of(msg)
            if ct not in SDP_TYPES:
                self.respond(st, msg, 415, headers=[("accept", "application/sdp")])
                return
        if method == "INVITE":
            accept = msg.headers.get("accept")
            if accept and not any(a.split(";")[0].strip().lower() in ACCEPT_OK for a in accept):
                # RFC 3261 21.4.7 / RFC 4475 3.3.15: we can only answer with SDP.
                self.respond(st, msg, 406, headers=[("accept", "application/sdp")])
                return
        if msg.to_tag is not None:
            self.in_dialog(msg, st)
            return
        if method == "INVITE":
            self.on_invite(msg, st)
        elif method == "OPTIONS":
            if self.draining:
                # A draining node tells a front door's OPTIONS probe (Kamailio's
                # dispatcher) to send its new calls elsewhere.
                self.respond(st, msg, 503, headers=[("retry-after", "30")])
            else:
                self.respond(st, msg, 200, headers=self.capabilities())
        elif method == "MESSAGE":
            # RFC 3428: pager mode, no dialog; the application answers (202 or a refusal).
            on_text = getattr(self.app, "on_text", None)
            if on_text is None:
                self.respond(st, msg, 405, headers=[("allow", build.ALLOW)])
            else:
                on_text(msg, st)
        elif method == "REGISTER":
            if self.registrar is None:
                self.respond(st, msg, 405, headers=[("allow", build.ALLOW)])
            else:
                self.registrar.on_register(self, msg, st)
        else:
            # BYE, INFO, UPDATE outside a dialog.
            self.respond(st, msg, 481)

    def capabilities(self) -> list:
        return [("allow", build.ALLOW), ("accept", "application/sdp, text/plain"),
                ("accept-encoding", "identity"), ("accept-language", "en")]

    def on_invite(self, msg, st) -> None:
        if self.draining:
            self.respond(st, msg, 503, headers=[("retry-after", "30")])
            return
        h = msg.headers
        kept = [*h.get("contact", ())[:1], *h.get("from", ())[:1], *h.get("to", ())[:1],
                *h.get("record-route", ()), msg.call_id or ""]
        if any(build.has_control(v) for v in kept if isinstance(v, str)):
            # The dialog would write these into every request it sends (a BYE, a
            # re-INVITE): the message builder refuses control characters, so refuse
            # them here, before there is a dialog (RFC 3261 25.1: no CTLs but HTAB).
            self.respond(st, msg, 400, reason="Control Character in Header")
            return
        if h.get("contact"):
            try:
                check_uri_text(strip_brackets(h["contact"][0]), "Contact")
            except ValueError:
                # The remote target becomes every later request's Request-URI.
                self.respond(st, msg, 400, reason="Bad Contact URI")
                return
        d = Dialog.from_invite(self, msg, st.flow, st)
        self.dialogs[d.key] = d
        st.tu = d
        st.on_timeout = _on_no_ack
        self.stats["invites"] += 1
        self.overload.setup_started()
        self.app.on_invite(d)
        # RFC 3261 17.2.1: 100 Trying unless the TU answered straight away.
        if st.state == PROCEEDING and st.last is None:
            self.respond(st, msg, 100)

    def on_ack(self, msg) -> None:
        d = self.dialogs.get((msg.call_id, msg.to_tag, msg.from_tag or ""))
        if d is not None:
            d.on_ack(msg)

    def on_cancel(self, msg, flow: Flow, key: str) -> None:
        # RFC 3261 9.2: CANCEL matches the INVITE's server transaction.
        invite_key = server_key(msg, "INVITE")
        invite_st = self.transactions.server.get(invite_key)
        st = self.transactions.new_server(key, msg, flow)
        if invite_st is None:
            if invite_key in self.transactions.lingering:
                # RFC 3261 9.2: the INVITE has its final response already; the CANCEL
                # is answered and changes nothing.
                self.respond(st, msg, 200, to_tag=None if msg.to_tag else build.new_tag())
            else:
                self.respond(st, msg, 481)
            return
        self.respond(st, msg, 200, to_tag=None if msg.to_tag else build.new_tag())
        d = invite_st.tu
        if invite_st.state == PROCEEDING and d is not None and d.state == EARLY:
            d.reject(487, why="cancel")

    def in_dialog(self, msg, st) -> None:
        method = msg.method
        d = self.dialogs.get((msg.call_id, msg.to_tag, msg.from_tag or ""))
        if d is None:
            self.respond(st, msg, 481)
            return
        # RFC 3261 12.2.2: CSeq must increase within the dialog.
        if msg.cseq <= d.remote_cseq:
            self.respond(st, msg, 500, reason="CSeq Out of Order", to_tag=d.local_tag)
            return
        d.remote_cseq = msg.cseq
        if method == "BYE":
            self.respond(st, msg, 200, to_tag=d.local_tag)
            d._terminate("bye")
        elif method in ("INVITE", "UPDATE"):
            self.on_reoffer(d, msg, st)
        elif method == "OPTIONS":
            self.respond(st, msg, 200, headers=self.capabilities(), to_tag=d.local_tag)
        elif method == "MESSAGE":
            # RFC 3428 2: a MESSAGE inside a dialog belongs to that dialog's session.
            on_text = getattr(self.app, "on_text_in_dialog", None)
            if on_text is None:
                self.respond(st, msg, 405, headers=[("allow", build.ALLOW)], to_tag=d.local_tag)
            else:
                a = on_text(d, msg)
                if isinstance(a, asyncio.Future):   # the policy waits for the cluster
                    a.add_done_callback(lambda f, st=st, msg=msg, tag=d.local_tag:
                                        self._answer_text(st, msg, f.result(), tag))
                else:
                    self._answer_text(st, msg, a, d.local_tag)
        else:
            status = 200
            if d.owner is not None:
                status = d.owner.dialog_request(d, msg)
            self.respond(st, msg, status, to_tag=d.local_tag)

    def _answer_text(self, st, msg, a, to_tag: str) -> None:
        self.respond(st, msg, a.status, reason=a.reason, headers=list(a.headers), to_tag=to_tag)

    def on_reoffer(self, d: Dialog, msg, st) -> None:
        from engine.sip.errors import SdpError

        if d.state != CONFIRMED or (msg.method == "INVITE" and d.ok_data is not None):
            # RFC 3261 14.2: a re-INVITE before the ACK of the last 2xx.
            self.respond(st, msg, 500, headers=[("retry-after", "1")], to_tag=d.local_tag)
            return
        try:
            if msg.body:
                answer = d.owner.dialog_reoffer(d, msg.body) if d.owner else d.local_sdp
            else:
                answer = d.local_sdp  # offerless re-INVITE: our offer, answer in the ACK
        except SdpError as exc:
            self.respond(st, msg, 488, reason=str(exc)[:60] or None, to_tag=d.local_tag)
            return
        headers = [("contact", self.contact_for(st.flow)), ("content-type", "application/sdp")]
        data = build.response(msg, 200, st.flow.addr, d.local_tag, headers=headers,
                              body=answer, server=self.user_agent)
        self.stats["sent_200"] += 1
        st.respond(200, data)
        if msg.method == "INVITE":
            d.local_sdp = answer
            d.ok_data = data
            d.ok_gen += 1
            d.ok_interval = 0.5
            d.ok_elapsed = 0.0
            if not st.flow.reliable:
                self.timers.arm(0.5, d._retransmit_ok, d.ok_gen)

    def on_response(self, msg, flow: Flow) -> None:
        self.stats["responses"] += 1
        if msg.error is not None or msg.via_branch is None:
            return  # RFC 4475 3.1.2.5: drop broken responses
        self.rx_statuses[msg.status] += 1
        ct = self.transactions.client.get(client_key(msg.via_branch, msg.cseq_method))
        if ct is None:
            return  # RFC 3261 18.1.2: no matching transaction (e.g. RFC 4475 3.3.10)
        ct.on_message(msg)


def _on_no_ack(st) -> None:
    d = st.tu
    if d is not None:
        d._terminate("ack-timeout")
