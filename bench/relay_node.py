#!/usr/bin/env python3
"""Baton's RTP relay (ext.rtp) on its own, under uvloop, for the relay benchmarks.

Two modes:

  relay_node.py --in-port P --out-port Q
      One relayed direction, the slot common.run_gen_sink() fills: stream A, bound on
      127.0.0.1:P, relays to stream B (bound on an ephemeral port) whose remote is
      127.0.0.1:Q.  A latches to the generator by symmetric RTP.

  relay_node.py --calls N --ports-file F
      N bridged calls: pairs (A_i, B_i) with A_i.relay_to(B_i) and B_i.relay_to(A_i), all
      in one hub.  Every stream latches to the first source that sends to it.  Once the
      hub is on the loop, the bound ports are written to F (atomically) as
      {"host": "127.0.0.1", "calls": N, "pairs": [[A_1, B_1], ...]}.

The event loop watches hub.fd and calls hub.poll(), exactly as the engine's MediaEngine
does.  Runs until SIGTERM or SIGINT (or --max-seconds), then prints one JSON line:

  {"tool": "relay_node", "relayed": packets sent by the relaying streams, "pps": ...,
   "wakeups": hub wakeups, "rx_invalid": ..., "rx_foreign": ..., "socket_drops": ...}

seconds and pps span the first wakeup with traffic to the last packet received.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ext import rtp  # noqa: E402

LOOPBACK = "127.0.0.1"
# Python's socket module does not export it; the Linux value is stable.
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


def raise_nofile_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit: 2 sockets per call add up fast."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            target = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def udp_socket(rcvbuf: int) -> socket.socket:
    """A non-blocking, not yet bound UDP socket, as MediaEngine's port pool makes them.

    RCVBUF 0 keeps the kernel default (what the engine runs with); anything else is
    forced past rmem_max when the process may, like bench/baseline/relay.c does.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    if rcvbuf > 0:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    return sock


def udp_drops(ports: set[int]) -> int:
    """Datagrams the kernel dropped at our sockets' receive queues (/proc/net/udp)."""
    drops = 0
    try:
        rows = Path("/proc/net/udp").read_text().splitlines()[1:]
    except OSError:
        return 0
    for row in rows:
        cols = row.split()
        if len(cols) < 13:
            continue
        try:
            port = int(cols[1].rsplit(":", 1)[1], 16)
        except (IndexError, ValueError):
            continue
        if port in ports:
            drops += int(cols[12])
    return drops


def write_atomically(path: Path, text: str) -> None:
    """Readers see the whole file or none: write beside it, then rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RelayNode:
    """The hub, its streams and which of them send relayed packets."""

    def __init__(self) -> None:
        self.hub = rtp.RtpHub()
        self.streams: list[Any] = []
        self.senders: list[Any] = []       # streams whose tx_packets count as relayed
        self.receivers: list[Any] = []     # streams traffic arrives on
        self.sockets: list[socket.socket] = []
        self.first_ns = 0

    def stream(self, sock: socket.socket) -> Any:
        s = rtp.RtpStream(sock, 0, -1)
        self.hub.add(s)
        self.streams.append(s)
        self.sockets.append(sock)
        return s

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Put the hub on the loop, noting when the first traffic arrives.

        The first wakeup goes through a Python callback that records the time and then
        hands the fd to hub.poll itself, so the steady state is the engine's path with
        nothing of ours in it.
        """
        def first_wakeup() -> None:
            self.first_ns = time.monotonic_ns()
            loop.remove_reader(self.hub.fd)
            loop.add_reader(self.hub.fd, self.hub.poll)
            self.hub.poll()

        loop.add_reader(self.hub.fd, first_wakeup)

    def report(self, mode: str, calls: int, uptime_s: float) -> dict[str, Any]:
        relayed = sum(s.tx_packets for s in self.senders)
        received = sum(s.rx_packets for s in self.receivers)
        last_ns = max((s.last_rx_ns for s in self.streams), default=0)
        span = (last_ns - self.first_ns) / 1e9 if self.first_ns and last_ns else 0.0
        wakeups = int(self.hub.wakeups)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        ports = {sock.getsockname()[1] for sock in self.sockets}
        return {
            "tool": "relay_node",
            "mode": mode,
            "calls": calls,
            "streams": len(self.streams),
            "received": received,
            "relayed": relayed,
            "seconds": round(span, 3),
            "pps": round(relayed / span) if span > 0 else 0,
            "wakeups": wakeups,
            "packets_per_wakeup": round(relayed / wakeups, 2) if wakeups else None,
            "rx_invalid": sum(s.rx_invalid for s in self.streams),
            "rx_foreign": sum(s.rx_foreign for s in self.streams),
            "socket_drops": udp_drops(ports),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
            "uptime_s": round(uptime_s, 3),
        }


def setup_pair(node: RelayNode, in_port: int, out_port: int, rcvbuf: int) -> socket.socket:
    """Mode (a): A on IN_PORT relays to B, whose remote is OUT_PORT.  Returns A's socket,
    still unbound: binding it is the last step, so a bound port means a ready relay."""
    a_sock, b_sock = udp_socket(rcvbuf), udp_socket(rcvbuf)
    b_sock.bind((LOOPBACK, 0))
    a, b = node.stream(a_sock), node.stream(b_sock)
    b.set_remote(LOOPBACK, out_port)
    a.relay_to(b)
    node.senders.append(b)
    node.receivers.append(a)
    return a_sock


def setup_calls(node: RelayNode, calls: int, rcvbuf: int) -> list[tuple[int, int]]:
    """Mode (b): CALLS bridged pairs on ephemeral ports; returns their (A, B) ports."""
    pairs: list[tuple[int, int]] = []
    for _ in range(calls):
        a_sock, b_sock = udp_socket(rcvbuf), udp_socket(rcvbuf)
        a_sock.bind((LOOPBACK, 0))
        b_sock.bind((LOOPBACK, 0))
        a, b = node.stream(a_sock), node.stream(b_sock)
        a.relay_to(b)
        b.relay_to(a)
        node.senders += [a, b]
        node.receivers += [a, b]
        pairs.append((a_sock.getsockname()[1], b_sock.getsockname()[1]))
    return pairs


async def serve(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    started = time.monotonic()
    node = RelayNode()
    if args.calls:
        pairs = setup_calls(node, args.calls, args.rcvbuf)
        node.attach(loop)
        write_atomically(args.ports_file, json.dumps(
            {"host": LOOPBACK, "calls": args.calls, "pairs": pairs}) + "\n")
        mode = "calls"
    else:
        a_sock = setup_pair(node, args.in_port, args.out_port, args.rcvbuf)
        node.attach(loop)
        a_sock.bind((LOOPBACK, args.in_port))
        mode = "pair"
    try:
        await asyncio.wait_for(stop.wait(), timeout=args.max_seconds)
    except asyncio.TimeoutError:
        pass
    loop.remove_reader(node.hub.fd)
    result = node.report(mode, args.calls or 1, time.monotonic() - started)
    node.hub.close()
    for sock in node.sockets:
        sock.close()
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Baton's RTP relay under uvloop, for benchmarks.")
    p.add_argument("--in-port", type=int, help="mode (a): port stream A is bound on")
    p.add_argument("--out-port", type=int, help="mode (a): where stream B sends")
    p.add_argument("--calls", type=int, default=0, help="mode (b): bridged calls")
    p.add_argument("--ports-file", type=Path, help="mode (b): where the ports are written")
    p.add_argument("--rcvbuf", type=int, default=0,
                   help="receive buffer per socket in bytes; 0 keeps the kernel default, "
                        "as the engine does (default: %(default)s)")
    p.add_argument("--max-seconds", type=float, default=600.0,
                   help="stop by itself after this long (default: %(default)s)")
    args = p.parse_args(argv)
    pair = args.in_port is not None or args.out_port is not None
    if pair == bool(args.calls):
        p.error("give either --in-port and --out-port, or --calls and --ports-file")
    if pair and (args.in_port is None or args.out_port is None):
        p.error("--in-port and --out-port go together")
    if args.calls and (args.calls < 1 or args.ports_file is None):
        p.error("--calls needs a positive count and --ports-file")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    nofile = raise_nofile_limit()
    if args.calls and 2 * args.calls + 64 > nofile:
        sys.stderr.write(f"relay_node: {2 * args.calls} sockets exceed the fd limit {nofile}\n")
        return 2
    result = uvloop.run(serve(args))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
