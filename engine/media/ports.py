"""RTP/RTCP port pairs from a configured range (RTP even, RTCP = RTP + 1)."""
from __future__ import annotations

import collections
import socket


class PortsExhausted(Exception):
    """No free RTP port pair: the call is refused with 503."""


class RtpPorts:
    """A bound RTP socket and its RTCP port (RTP + 1). Released exactly once.

    The RTCP socket is bound on first use (`rtcp_socket()`, once the far end's RTP has
    arrived): a call held without media costs one descriptor, not two."""

    __slots__ = ("pool", "port", "rtp", "rtcp", "rtcp_failed")

    def __init__(self, pool, port, rtp, rtcp=None):
        self.pool = pool
        self.port = port
        self.rtp = rtp
        self.rtcp = rtcp
        self.rtcp_failed = False

    def rtcp_socket(self):
        """The RTCP socket, bound now if it is not yet; None when the port is taken (then
        the call goes without RTCP) or the pair is released."""
        if self.rtcp is None and self.rtp is not None and not self.rtcp_failed:
            self.rtcp = self.pool._bind(self.port + 1)
            self.rtcp_failed = self.rtcp is None
        return self.rtcp

    def release(self) -> None:
        if self.rtp is not None:
            self.pool._give_back(self)
            self.rtp = self.rtcp = None


class PortPool:
    """Even ports of a range, handed out oldest-released first.

    Up to `keep_open` released pairs stay bound (a call set-up then costs no
    socket(), bind() or close()); the rest are closed. A reused pair is
    drained of datagrams that arrived for its previous call. Only the RTP port is
    bound at allocation; the RTCP port once the call has media."""

    def __init__(self, address: str, lo: int, hi: int, keep_open: int = 512):
        self.address = address
        self.family = socket.AF_INET6 if ":" in address else socket.AF_INET
        first = lo + (lo & 1)
        self._free = collections.deque(range(first, hi, 2))
        self._open = collections.deque()     # (port, rtp, rtcp) still bound
        self.keep_open = keep_open
        self.capacity = len(self._free)
        self.in_use = 0

    def _give_back(self, ports: RtpPorts) -> None:
        self.in_use -= 1
        if len(self._open) < self.keep_open:
            self._open.append((ports.port, ports.rtp, ports.rtcp))
        else:
            ports.rtp.close()
            if ports.rtcp is not None:
                ports.rtcp.close()
            self._free.append(ports.port)

    def close(self) -> None:
        while self._open:
            port, rtp, rtcp = self._open.popleft()
            rtp.close()
            if rtcp is not None:
                rtcp.close()
            self._free.append(port)

    def _bind(self, port: int):
        """A non-blocking UDP socket bound to `port`, or None when the port is taken."""
        sock = socket.socket(self.family, socket.SOCK_DGRAM)
        try:
            sock.bind((self.address, port))
        except OSError:
            sock.close()
            return None
        sock.setblocking(False)
        return sock

    def allocate(self) -> RtpPorts:
        # Pairs still bound are reused only after the ones that were closed, so a
        # port's last call has had time to stop sending to it.
        if self._open and (len(self._open) >= self.keep_open // 2 or not self._free):
            port, rtp, rtcp = self._open.popleft()
            _drain(rtp)
            if rtcp is not None:
                _drain(rtcp)
            self.in_use += 1
            return RtpPorts(self, port, rtp, rtcp)
        # Ports another process holds are skipped and retried later.
        for _ in range(len(self._free)):
            port = self._free.popleft()
            rtp = self._bind(port)
            if rtp is None:
                self._free.append(port)
                continue
            self.in_use += 1
            return RtpPorts(self, port, rtp)
        raise PortsExhausted(f"no free RTP port pair in the range ({self.capacity} pairs)")


def _drain_py(sock) -> None:
    try:
        while True:
            sock.recv(2048)
    except (BlockingIOError, InterruptedError):
        pass


def _drain_c(sock) -> None:
    _drain_socket(sock.fileno())


_drain_socket = None


def _drain(sock) -> None:
    """Throw away what waits on a reused socket (the last call's late packets)."""
    global _drain, _drain_socket
    try:
        from ext.kernels import rtp
        _drain_socket = rtp.drain_socket
        _drain = _drain_c
    except (ImportError, AttributeError):
        _drain = _drain_py
    _drain(sock)
