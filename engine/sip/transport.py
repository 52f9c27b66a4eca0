"""SIP transports: UDP datagrams and TCP streams (RFC 3261 18).

Each transport hands complete messages (bytes) with their source address to
`core.on_message(data, flow, stream)`. TCP frames by Content-Length,
copes with pipelined and fragmented messages and reuses connections for
responses and for requests towards the same peer.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import socket
from dataclasses import dataclass

from ext.kernels import sip as parser
from ext.sip_message import MAX_MESSAGE, SipParseError
from engine.sip.transaction import Flow

log = logging.getLogger("baton.sip.transport")

MAX_CONNECTIONS = 4096
TCP_IDLE_TIMEOUT = 120.0
MAX_PER_SOURCE = 64
FLOW_CACHE = 4096          # UDP peer addresses whose Flow is kept for reuse


@dataclass
class TcpLimits:
    """Bounds on SIP/TCP connections (`[sip]` in the config, docs/security.md)."""

    idle_timeout: float = TCP_IDLE_TIMEOUT   # seconds without a complete message or keep-alive
    max_connections: int = MAX_CONNECTIONS   # in all
    max_per_source: int = MAX_PER_SOURCE     # per source IP address



def size_buffers(sock: socket.socket, rcvbuf: int) -> int:
    """Ask for `rcvbuf` octets of receive buffer (and as much send buffer) so a burst of
    datagrams waits in the kernel instead of being dropped. Linux caps SO_RCVBUF at
    net.core.rmem_max; with CAP_NET_ADMIN, SO_RCVBUFFORCE passes the cap. Returns what
    the kernel granted (getsockopt reports twice the usable size)."""
    for opt in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
        if opt is None:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, rcvbuf)
            break
        except OSError:
            continue
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, rcvbuf)
    except OSError:
        pass
    granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    if granted // 2 < rcvbuf:
        log.warning("SIP/UDP receive buffer is %d octets, %d asked: raise net.core.rmem_max "
                    "(docs/operators-guide.md)", granted // 2, rcvbuf)
    return granted


def _batch_io():
    """(recv_datagrams, send_datagrams) of the RTP extension, or None when it is not built."""
    try:
        from ext.kernels import rtp
        return rtp.recv_datagrams, rtp.send_datagrams
    except (ImportError, AttributeError):
        return None


class UdpTransport(asyncio.DatagramProtocol):
    """SIP over one UDP socket.

    Batched (`start`, the usual way): the socket is read with recvmmsg, up to 64
    datagrams per system call and loop callback, and what the engine answers while it
    handles them (responses, ACKs: `Flow.send_or_drop`) is gathered in `batch` and sent
    with one sendmmsg once they are all handled. A send that must report its failure
    (`send`, a new request) first sends what is gathered, so the order on the wire stays
    the order in which the engine sent. Under load the kernel queue holds many datagrams
    and this is where the time per datagram goes down; past capacity it is what lets the
    engine refuse new calls cheaply enough to keep its goodput.
    Without the extension it is an asyncio datagram protocol (one callback per datagram)."""

    name = "UDP"
    reliable = False

    def __init__(self, core, sock=None):
        self.core = core
        self.sock = sock
        self.transport: asyncio.DatagramTransport | None = None
        self.local = ("", 0)
        self._flows: dict = {}
        self.rcvbuf = 0     # the receive buffer the kernel granted (octets, as getsockopt says)
        self.batch: list | None = None   # sends gathered while a batch is handled
        self._loop = None
        self._fd = -1
        self._io = None

    def start(self, loop) -> bool:
        """Read the socket in batches (see the class); False: the extension is not built."""
        io = _batch_io()
        if io is None or self.sock is None:
            return False
        self._io = io
        self._loop = loop
        self._fd = self.sock.fileno()
        self.sock.setblocking(False)
        self._opened(self.sock)
        loop.add_reader(self._fd, self._readable)
        return True

    def connection_made(self, transport):
        self.transport = transport
        self._opened(transport.get_extra_info("socket"))

    def _opened(self, sock) -> None:
        self.rcvbuf = size_buffers(sock, self.core.udp_rcvbuf)
        self.core.overload.sockets.append(sock)   # its receive queue is a load input
        self.local = sock.getsockname()[:2]

    def _readable(self) -> None:
        try:
            datagrams = self._io[0](self._fd)
        except OSError as exc:
            log.debug("udp receive error: %s", exc)
            return
        if not datagrams:
            return
        self.batch = batch = []
        try:
            received = self.datagram_received
            for data, addr in datagrams:
                received(data, addr)
        finally:
            self.batch = None
            if batch:
                self._flush(batch)

    def _flush(self, batch: list) -> None:
        """Send what was gathered: sendmmsg, and on its own whatever it could not send."""
        send_all = self._io[1]
        i, n = 0, len(batch)
        while i < n:
            try:
                i = send_all(self._fd, batch, i)
            except Exception:
                log.exception("batched send failed; sending one by one")
            if i >= n:
                break
            data, addr = batch[i]
            try:
                self._send_now(data, addr)
            except OSError as exc:
                log.info("message to %s dropped: %s", addr, exc)
            i += 1

    def datagram_received(self, data, addr):
        # One Flow per peer address, shared by its messages and transactions: a Flow is
        # never changed, and a busy peer would otherwise get a new one per datagram.
        flow = self._flows.get(addr)
        if flow is None:
            flows = self._flows
            if len(flows) >= FLOW_CACHE:
                flows.clear()
            flow = flows[addr] = Flow(self, addr[:2])
        self.core.on_message(data, flow, False)

    def error_received(self, exc):
        # ICMP port unreachable and friends: the transaction timers handle the loss.
        log.debug("udp error: %s", exc)

    def send_or_drop(self, data: bytes, addr) -> None:
        """Send where a failure is a lost message (a response, an ACK): while a batch is
        handled, gathered and sent with the batch's others."""
        batch = self.batch
        if batch is not None and len(data) <= MAX_MESSAGE:
            batch.append((data, addr))
            return
        try:
            self.send(data, addr)
        except OSError as exc:
            log.info("message to %s dropped: %s", addr, exc)

    def send(self, data: bytes, addr) -> None:
        batch = self.batch
        if batch:
            # What was gathered goes first, so the peer sees the engine's order.
            gathered = batch[:]
            batch.clear()
            self._flush(gathered)
        self._send_now(data, addr)

    def _send_now(self, data: bytes, addr) -> None:
        if len(data) > MAX_MESSAGE:
            raise OSError("message exceeds the datagram limit")
        sock = self.sock
        if sock is not None:
            # Straight to the socket: the transport's own path costs more per datagram.
            try:
                sock.sendto(data, addr)
                return
            except (BlockingIOError, InterruptedError):
                if self.transport is None:
                    raise   # batched: nothing queues behind the socket; a lost datagram
        self.transport.sendto(data, addr)

    def close(self):
        sock = self.sock if self.transport is None else self.transport.get_extra_info("socket")
        if sock is not None:
            sockets = self.core.overload.sockets
            for i, s in enumerate(sockets):
                if s is sock:
                    del sockets[i]
                    break
        if self.transport is not None:
            self.transport.close()
        elif self._loop is not None and self._fd >= 0:
            self._loop.remove_reader(self._fd)
            self._fd = -1
            self.sock.close()


class TcpConnection(asyncio.Protocol):
    """One TCP connection; it is the transport of the flows it carries."""

    name = "TCP"
    reliable = True

    def __init__(self, listener: "TcpTransport"):
        self.listener = listener
        self.core = listener.core
        self.transport = None
        self.peer = ("", 0)
        self.buf = bytearray()
        self.pending: list[bytes] = []
        self.last_activity = 0.0
        self.closed = False

    def connection_made(self, transport):
        self.transport = transport
        self.peer = transport.get_extra_info("peername")[:2]
        self.last_activity = asyncio.get_running_loop().time()
        listener = self.listener
        limits = listener.limits
        if len(listener.connections) >= limits.max_connections or \
                listener.per_source[self.peer[0]] >= limits.max_per_source:
            # A full table, or one source holding its share: refuse rather than let
            # idle connections lock everyone else out.
            self.core.stats["tcp_refused"] += 1
            self.closed = True
            transport.abort()
            return
        listener.connections[self.peer] = self
        listener.per_source[self.peer[0]] += 1
        for data in self.pending:
            transport.write(data)
        self.pending.clear()

    def data_received(self, data):
        if self.closed:
            return
        buf = self.buf
        buf += data
        while buf:
            # RFC 5626 4.4.1: CRLF keep-alives between messages.
            if buf[:1] in (b"\r", b"\n"):
                if buf[:4] == b"\r\n\r\n":
                    self.transport.write(b"\r\n")  # pong
                    self.last_activity = asyncio.get_running_loop().time()
                    del buf[:4]
                    continue
                if len(buf) < 4 and b"\r\n\r\n".startswith(bytes(buf)):
                    return
                del buf[:1]
                continue
            try:
                n = parser.frame_length(bytes(buf))
            except SipParseError as exc:
                # The stream cannot be re-synchronised: close it (RFC 3261 18.3).
                log.info("closing TCP connection from %s: %s", self.peer, exc)
                self.core.stats["parse_errors"] += 1
                self.transport.close()
                buf.clear()
                return
            if n == 0:
                if len(buf) > MAX_MESSAGE:
                    self.transport.close()
                    buf.clear()
                return
            msg = bytes(buf[:n])
            del buf[:n]
            # Only a complete message counts as activity: a trickle of bytes
            # does not keep a connection open.
            self.last_activity = asyncio.get_running_loop().time()
            self.core.on_message(msg, Flow(self, self.peer), True)

    def connection_lost(self, exc):
        self.closed = True
        listener = self.listener
        if listener.connections.get(self.peer) is self:
            del listener.connections[self.peer]
            left = listener.per_source[self.peer[0]] - 1
            if left > 0:
                listener.per_source[self.peer[0]] = left
            else:
                del listener.per_source[self.peer[0]]

    def send(self, data: bytes, addr=None) -> None:
        if self.closed:
            raise OSError("TCP connection closed")
        if self.transport is None:
            self.pending.append(data)
        else:
            self.transport.write(data)

    def close(self):
        if self.transport is not None:
            self.transport.close()


class TcpTransport:
    """The listening socket, plus the table of connections for reuse."""

    name = "TCP"
    reliable = True

    def __init__(self, core, limits: TcpLimits | None = None):
        self.core = core
        self.limits = limits or TcpLimits()
        self.server: asyncio.base_events.Server | None = None
        self.connections: dict[tuple, TcpConnection] = {}
        self.per_source: collections.Counter = collections.Counter()  # IP -> connections
        self.local = ("", 0)

    async def listen(self, host: str, port: int):
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: TcpConnection(self), host, port,
                                               reuse_address=True, backlog=1024)
        self.local = self.server.sockets[0].getsockname()[:2]

    def send(self, data: bytes, addr) -> None:
        """Send over an existing connection to `addr`, or open one (RFC 3261 18.1.1)."""
        conn = self.connections.get(tuple(addr))
        if conn is None:
            conn = TcpConnection(self)
            conn.pending.append(data)
            loop = asyncio.get_running_loop()
            loop.create_task(self._connect(conn, addr))
            return
        conn.send(data)

    async def _connect(self, conn, addr):
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: conn, addr[0], addr[1])
        except OSError as exc:
            log.info("TCP connect to %s failed: %s", addr, exc)
            conn.closed = True

    def flow_to(self, addr) -> Flow:
        conn = self.connections.get(tuple(addr))
        return Flow(conn if conn is not None else self, tuple(addr))

    def close_idle(self, now: float) -> int:
        """Close connections idle for longer than the limit; returns how many."""
        timeout = self.limits.idle_timeout
        idle = [c for c in self.connections.values() if now - c.last_activity > timeout]
        for conn in idle:
            conn.close()
        return len(idle)

    def close(self):
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections.values()):
            conn.close()
