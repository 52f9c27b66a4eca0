"""RTP/RTCP port pairs from a configured range (RTP even, RTCP = RTP + 1)."""
from __future__ import annotations

import collections
import socket


class PortsExhausted(Exception):
    """No free RTP port pair: the call is refused with 503."""


class RtpPorts:
    """A bound RTP socket and its RTCP neighbour. Released exactly once."""

    __slots__ = ("pool", "port", "rtp", "rtcp")

    def __init__(self, pool, port, rtp, rtcp):
        self.pool = pool
        self.port = port
        self.rtp = rtp
        self.rtcp = rtcp

    def release(self) -> None:
        if self.rtp is not None:
            self.rtp.close()
            self.rtcp.close()
            self.rtp = self.rtcp = None
            self.pool._free.append(self.port)
            self.pool.in_use -= 1


class PortPool:
    def __init__(self, address: str, lo: int, hi: int):
        self.address = address
        self.family = socket.AF_INET6 if ":" in address else socket.AF_INET
        first = lo + (lo & 1)
        self._free = collections.deque(range(first, hi, 2))
        self.capacity = len(self._free)
        self.in_use = 0

    def allocate(self) -> RtpPorts:
        # Ports another process holds are skipped and retried later.
        for _ in range(len(self._free)):
            port = self._free.popleft()
            rtp = socket.socket(self.family, socket.SOCK_DGRAM)
            rtcp = socket.socket(self.family, socket.SOCK_DGRAM)
            try:
                rtp.bind((self.address, port))
                rtcp.bind((self.address, port + 1))
            except OSError:
                rtp.close()
                rtcp.close()
                self._free.append(port)
                continue
            rtp.setblocking(False)
            rtcp.setblocking(False)
            self.in_use += 1
            return RtpPorts(self, port, rtp, rtcp)
        raise PortsExhausted(f"no free RTP port pair in the range ({self.capacity} pairs)")
