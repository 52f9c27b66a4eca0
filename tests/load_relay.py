"""An RTP impairment relay for the `baton load` accuracy tests (run inside a netns).

It binds LISTEN:P for every even port P of the target's RTP range. A datagram from
the generator to LISTEN:P is held for `delay` ms and sent on to TARGET:P from the same
socket (so the target latches onto it, RFC 4961); what the target sends back to
LISTEN:P is held for `delay` ms plus a uniform draw in [0, `jitter`] ms and sent to the
generator's last address. Packets leave in the order of their due times.

On SIGTERM it writes a JSON report: per return stream, the RFC 3550 (A.8) interarrival
jitter of what it actually sent, so a test compares the generator's measurement with
what was injected, timing errors of this relay included.

    python -m tests.load_relay LISTEN TARGET LO-HI DELAY_MS JITTER_MS SEED REPORT
"""
from __future__ import annotations

import heapq
import json
import random
import select
import signal
import socket
import sys
import time


class Jitter:
    """RFC 3550 A.8 over the send times of one stream (8 kHz timestamps)."""

    def __init__(self):
        self.transit = None
        self.j = 0.0
        self.n = 0

    def add(self, sent_s: float, ts: int) -> None:
        transit = sent_s * 8000.0 - ts
        if self.transit is not None:
            self.j += (abs(transit - self.transit) - self.j) / 16.0
        self.transit = transit
        self.n += 1


def main(argv: list) -> None:
    listen, target, ports, delay_ms, jitter_ms, seed, report = argv
    lo, hi = (int(x) for x in ports.split("-"))
    delay, spread = float(delay_ms) / 1000.0, float(jitter_ms) / 1000.0
    rng = random.Random(int(seed))
    socks, peers, streams = {}, {}, {}
    ep = select.epoll()
    for port in range(lo + (lo & 1), hi + 1, 2):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((listen, port))
        s.setblocking(False)
        socks[s.fileno()] = (s, port)
        ep.register(s.fileno(), select.EPOLLIN)
    queue: list = []              # (due, n, socket, data, destination, port or None)
    n = 0
    running = True

    def stop(*_):
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    while running:
        timeout = max(queue[0][0] - time.monotonic(), 0.0) if queue else 0.2
        for fd, _ in ep.poll(timeout):
            s, port = socks[fd]
            while True:
                try:
                    data, src = s.recvfrom(2048)
                except BlockingIOError:
                    break
                now = time.monotonic()
                if src == (target, port):           # the target's RTP back to the generator
                    dst = peers.get(port)
                    if dst is None:
                        continue
                    due, back = now + delay + rng.uniform(0.0, spread), port
                else:                               # the generator's RTP to the target
                    peers[port] = src
                    due, dst, back = now + delay, (target, port), None
                n += 1
                heapq.heappush(queue, (due, n, s, data, dst, back))
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, s, data, dst, back = heapq.heappop(queue)
            try:
                s.sendto(data, dst)
            except OSError:
                continue
            if back is not None and len(data) >= 12 and data[1] & 0x7F < 96:
                ts = int.from_bytes(data[4:8], "big")
                ssrc = int.from_bytes(data[8:12], "big")
                streams.setdefault((back, dst, ssrc), Jitter()).add(time.monotonic(), ts)
    out = [{"port": p, "packets": j.n, "jitter_ms": j.j / 8.0}
           for (p, _, _), j in streams.items()]
    with open(report, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1:])
