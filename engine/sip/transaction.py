"""The SIP transaction layer (RFC 3261 17, with the RFC 6026 Accepted states).

Server transactions absorb retransmitted requests and re-send the last
response; client transactions retransmit requests over unreliable
transports and time out. State and timer names follow the RFC.
"""
from __future__ import annotations

import enum
import logging
from collections import deque

from engine.sip.timers import T1, T2, T4, TIMER_64T1, TimerQueues

log = logging.getLogger("baton.sip")

MAGIC_COOKIE = "z9hG4bK"


class State(enum.IntEnum):
    # RFC 3261 17.1.1 / 17.1.2 / 17.2.1 / 17.2.2, RFC 6026 7.1/7.2 (Accepted)
    CALLING = 1
    TRYING = 2
    PROCEEDING = 3
    ACCEPTED = 4
    COMPLETED = 5
    CONFIRMED = 6
    TERMINATED = 7


CALLING = State.CALLING
TRYING = State.TRYING
PROCEEDING = State.PROCEEDING
ACCEPTED = State.ACCEPTED
COMPLETED = State.COMPLETED
CONFIRMED = State.CONFIRMED
TERMINATED = State.TERMINATED


def server_key(msg, method: str | None = None) -> str:
    """RFC 3261 17.2.3: branch + sent-by + method (ACK matches its INVITE).

    Without the magic cookie (RFC 2543 peers, RFC 4475 3.2.1) the key is
    built from Call-ID, CSeq, From tag and the top Via instead."""
    if method is None:
        method = msg.method
        if method == "ACK":
            method = "INVITE"
    branch = msg.via_branch
    if branch is not None and len(branch) > 7 and branch.startswith(MAGIC_COOKIE):
        return f"{branch}\x00{msg.via_host}:{msg.via_port}\x00{method}"
    via = msg.headers["via"][0] if msg.headers.get("via") else ""
    return f"2543\x00{msg.call_id}\x00{msg.cseq}\x00{msg.from_tag}\x00{via}\x00{method}"


def client_key(branch: str, method: str) -> str:
    # RFC 3261 17.1.3: branch of the top Via + CSeq method.
    if method == "ACK":
        method = "INVITE"
    return f"{branch}\x00{method}"


class Flow:
    """Where a message goes: a transport object and a (host, port) address."""

    __slots__ = ("transport", "addr")

    def __init__(self, transport, addr):
        self.transport = transport
        self.addr = addr

    @property
    def reliable(self) -> bool:
        return self.transport.reliable

    def send(self, data: bytes) -> None:
        self.transport.send(data, self.addr)

    def send_or_drop(self, data: bytes) -> None:
        """Send where a failure is a lost message, as a lost datagram would be: a
        response or ACK over a TCP connection the peer closed. The transaction and
        dialog timers deal with the loss (RFC 3261 17.2.4: a transport error ends
        the exchange; the peer opens a new connection for what it still needs)."""
        transport = self.transport
        if getattr(transport, "batch", None) is not None:
            transport.send_or_drop(data, self.addr)   # UDP: sent with its batch
            return
        try:
            transport.send(data, self.addr)
        except OSError as exc:
            log.info("message to %s dropped: %s", self.addr, exc)


class TransactionLayer:
    """Tables of live transactions and the timers that drive them.

    A server transaction that has nothing left to do but wait out Timer L (an
    INVITE answered 2xx: RFC 6026 Accepted) or Timer J (a non-INVITE answered
    over UDP: Completed) lingers as an entry of `lingering` instead of an
    object: its key, with the final response to re-send for a retransmitted
    request (None: absorb it) and the flow to send it on. At high call rates
    these are most of the transactions held (64*T1 of calls, twice per call),
    and as plain strings and bytes the garbage collector has nothing of them
    to walk."""

    def __init__(self, timers: TimerQueues):
        self.timers = timers
        self.server: dict[str, ServerTransaction] = {}
        self.client: dict[str, ClientTransaction] = {}
        self.lingering: dict[str, bytes | None] = {}
        self.linger_flows: dict[str, Flow] = {}
        self._linger_queue: deque = deque()     # (deadline, key), deadlines in order
        timers.sweepers.append(self._sweep)

    def linger(self, key: str, last: bytes | None, flow: Flow | None) -> None:
        """Keep `key` for 64*T1 (Timer L / Timer J): a retransmission of its request
        gets `last` again (None: nothing)."""
        self.lingering[key] = last
        if last is not None:
            self.linger_flows[key] = flow
        self._linger_queue.append((self.timers.clock() + TIMER_64T1, key))

    def absorb(self, key: str, msg) -> bool:
        """A request matching a lingering transaction: re-send its final response
        (RFC 3261 17.2.2) or absorb it (RFC 6026 7.1). False: no such transaction."""
        lingering = self.lingering
        if key not in lingering:
            return False
        last = lingering[key]
        if last is not None and msg.method != "ACK":
            self.linger_flows[key].send_or_drop(last)
        return True

    def _sweep(self, now: float) -> None:
        q = self._linger_queue
        lingering, flows = self.lingering, self.linger_flows
        while q and q[0][0] <= now:
            key = q.popleft()[1]
            if lingering.pop(key, 0) is not None:
                flows.pop(key, None)

    # -- server side ----------------------------------------------------------
    def new_server(self, key: str, msg, flow: Flow) -> "ServerTransaction":
        st = ServerTransaction(self, key, msg.method == "INVITE", flow)
        self.server[key] = st
        return st

    def new_client(self, key: str, flow: Flow, data: bytes, is_invite: bool,
                   on_response, make_ack=None) -> "ClientTransaction":
        ct = ClientTransaction(self, key, is_invite, flow, data, on_response, make_ack)
        self.client[key] = ct
        ct.start()
        return ct

    def counts(self) -> dict:
        return {"server": len(self.server) + len(self.lingering), "client": len(self.client)}


class ServerTransaction:
    """INVITE (IST) and non-INVITE (NIST) server transactions."""

    __slots__ = ("layer", "key", "is_invite", "state", "flow", "last", "gen",
                 "interval", "on_timeout", "on_ack", "tu", "__weakref__")

    def __init__(self, layer: TransactionLayer, key: str, is_invite: bool, flow: Flow):
        self.layer = layer
        self.key = key
        self.is_invite = is_invite
        self.state = PROCEEDING if is_invite else TRYING
        self.flow = flow
        self.last: bytes | None = None
        self.gen = 0
        self.interval = T1
        self.on_timeout = None   # TU callback: no ACK for a non-2xx final (Timer H)
        self.on_ack = None       # TU callback: ACK absorbed for a non-2xx final
        self.tu = None           # the TU object this transaction serves (a Dialog)

    def respond(self, status: int, data: bytes) -> None:
        """The TU sends a response through this transaction."""
        state = self.state
        if state >= COMPLETED or state == ACCEPTED:
            return  # RFC 3261 17.2.1: a final response was already sent
        self.last = data
        self.flow.send_or_drop(data)
        if status < 200:
            self.state = PROCEEDING
            return
        timers = self.layer.timers
        reliable = self.flow.reliable
        self.gen += 1
        if self.is_invite:
            if status < 300:
                # RFC 6026 7.1: Accepted, Timer L = 64*T1; the TU retransmits the 2xx.
                # Accepted only absorbs retransmitted INVITEs: the TU, its callbacks
                # and the 2xx are let go now rather than kept alive for Timer L (at
                # high call rates they would keep every recent call in memory and
                # make each full garbage collection walk them all).
                self.state = ACCEPTED
                self._retire(None)
            else:
                self.state = COMPLETED
                if not reliable:
                    self.interval = T1
                    timers.arm_method(T1, ServerTransaction._timer_g, self, self.gen)
                timers.arm_method(TIMER_64T1, ServerTransaction._timer_h, self, self.gen)
        else:
            self.state = COMPLETED
            if reliable:
                self._terminate()  # Timer J = 0 on reliable transports
            else:
                self._retire(data)

    def on_request(self, msg) -> None:
        """A retransmission of the request (or the ACK of an IST)."""
        if msg.method == "ACK":
            if self.state == COMPLETED:
                # RFC 3261 17.2.1: ACK moves to Confirmed; Timer I absorbs further ACKs.
                self.state = CONFIRMED
                self.gen += 1
                if self.on_ack is not None:
                    self.on_ack(self)
                if self.flow.reliable:
                    self._terminate()
                else:
                    self.layer.timers.arm_method(T4, ServerTransaction._timer_i, self, self.gen)
            return
        # RFC 3261 17.2.1 / 17.2.2: absorb, and re-send the last response.
        if self.last is not None and self.state in (PROCEEDING, COMPLETED):
            self.flow.send_or_drop(self.last)

    # -- timers ---------------------------------------------------------------
    def _timer_g(self, gen: int) -> None:
        if gen != self.gen or self.state != COMPLETED:
            return
        self.flow.send_or_drop(self.last)
        self.interval = min(self.interval * 2, T2)
        self.layer.timers.arm_method(self.interval, ServerTransaction._timer_g, self, gen)

    def _timer_h(self, gen: int) -> None:
        if gen != self.gen or self.state != COMPLETED:
            return
        callback, tu = self.on_timeout, self.tu
        self._terminate()
        if callback is not None:
            self.tu = tu
            callback(self)
            self.tu = None

    def _timer_i(self, gen: int) -> None:
        if gen == self.gen:
            self._terminate()

    def _retire(self, last: bytes | None) -> None:
        """Wait out Timer L or J as a `lingering` entry of the layer (see there): this
        object lets go of everything and leaves the table."""
        if self._let_go():
            self.layer.linger(self.key, last, self.flow)

    def _terminate(self) -> None:
        self.state = TERMINATED
        self._let_go()

    def _let_go(self) -> bool:
        """Drop the response, the TU and its callbacks, stop the timers armed so far,
        and leave the layer's table; True if this object was still in it."""
        self.gen += 1
        self.last = None
        self.on_ack = self.on_timeout = self.tu = None
        table = self.layer.server
        if table.get(self.key) is self:
            del table[self.key]
            return True
        return False


class ClientTransaction:
    """INVITE (ICT) and non-INVITE (NICT) client transactions.

    `on_response(ct, msg)` is called for every response passed up, and with
    msg=None when Timer B/F fires or the transport fails (the TU then acts
    as if a 408 arrived, RFC 3261 8.1.3.1)."""

    __slots__ = ("layer", "key", "is_invite", "state", "flow", "data", "gen", "interval",
                 "on_response", "make_ack", "ack", "__weakref__")

    def __init__(self, layer, key, is_invite, flow, data, on_response, make_ack):
        self.layer = layer
        self.key = key
        self.is_invite = is_invite
        self.state = CALLING if is_invite else TRYING
        self.flow = flow
        self.data = data
        self.gen = 0
        self.interval = T1
        self.on_response = on_response
        self.make_ack = make_ack
        self.ack: bytes | None = None

    def start(self) -> None:
        timers = self.layer.timers
        try:
            self.flow.send(self.data)
        except OSError:
            self._fail()
            return
        if not self.flow.reliable:
            timers.arm(T1, self._retransmit, self.gen)  # Timer A / Timer E
        timers.arm(TIMER_64T1, self._timeout, self.gen)  # Timer B / Timer F

    def on_message(self, msg) -> None:
        status = msg.status
        state = self.state
        if state in (COMPLETED, TERMINATED):
            if self.is_invite and status >= 300 and self.ack is not None:
                self.flow.send_or_drop(self.ack)  # RFC 3261 17.1.1.2: re-ACK retransmitted finals
            return
        if state == ACCEPTED:
            if 200 <= status < 300:
                self.on_response(self, msg)  # RFC 6026 7.2: 2xx retransmissions go to the TU
            return
        if status < 200:
            if state in (CALLING, TRYING):
                self.state = PROCEEDING
                if not self.is_invite:
                    pass  # RFC 3261 17.1.2.2: Timer E keeps running, at T2
                else:
                    self.gen += 1  # Timer A stops; keep Timer B semantics via on-call check
                    self.layer.timers.arm(TIMER_64T1 * 6, self._timeout, self.gen)
            self.on_response(self, msg)
            return
        self.gen += 1
        timers = self.layer.timers
        reliable = self.flow.reliable
        if self.is_invite:
            if status < 300:
                self.state = ACCEPTED
                timers.arm(TIMER_64T1, self._terminate_gen, self.gen)  # Timer M
            else:
                self.state = COMPLETED
                if self.make_ack is not None:
                    self.ack = self.make_ack(msg)
                    self.flow.send_or_drop(self.ack)
                if reliable:
                    self._terminate()
                else:
                    timers.arm(32.0, self._terminate_gen, self.gen)  # Timer D
        else:
            self.state = COMPLETED
            if reliable:
                self._terminate()
            else:
                timers.arm(T4, self._terminate_gen, self.gen)  # Timer K
        self.on_response(self, msg)

    def cancelled_by_tu(self) -> None:
        self._terminate()

    def _retransmit(self, gen: int) -> None:
        if gen != self.gen or self.state not in (CALLING, TRYING, PROCEEDING):
            return
        if self.is_invite and self.state != CALLING:
            return
        try:
            self.flow.send(self.data)
        except OSError:
            self._fail()
            return
        if self.is_invite:
            self.interval *= 2  # RFC 3261 17.1.1.2 Timer A doubles without cap
        else:
            self.interval = T2 if self.state == PROCEEDING else min(self.interval * 2, T2)
        self.layer.timers.arm(self.interval, self._retransmit, gen)

    def _timeout(self, gen: int) -> None:
        if gen != self.gen or self.state in (COMPLETED, ACCEPTED, TERMINATED):
            return
        self._fail()

    def _fail(self) -> None:
        self._terminate()
        self.on_response(self, None)

    def _terminate_gen(self, gen: int) -> None:
        if gen == self.gen:
            self._terminate()

    def _terminate(self) -> None:
        self.state = TERMINATED
        self.gen += 1
        table = self.layer.client
        if table.get(self.key) is self:
            del table[self.key]
