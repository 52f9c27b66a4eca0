"""SIP/TCP connection limits, probed from inside a loopback-only network namespace
(`ip netns exec NAME python tests/tcp_limits_peer.py HOST PORT CAP IDLE`).

Opens CAP idle connections from 127.0.0.1 and one more, asks OPTIONS from
127.0.0.2, waits for the idle ones to be closed, and prints one JSON line."""
from __future__ import annotations

import json
import secrets
import socket
import sys
import time


def options(host: str, port: int, sock: socket.socket) -> bytes:
    lh, lp = sock.getsockname()[:2]
    return (f"OPTIONS sip:{host}:{port} SIP/2.0\r\n"
            f"Via: SIP/2.0/TCP {lh}:{lp};branch=z9hG4bK{secrets.token_hex(6)}\r\n"
            f"Max-Forwards: 70\r\nTo: <sip:{host}:{port}>\r\n"
            f"From: <sip:probe@{lh}:{lp}>;tag={secrets.token_hex(4)}\r\n"
            f"Call-ID: {secrets.token_hex(8)}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
            ).encode()


def connect(host: str, port: int, source: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.connect((host, port))
    return s


def closed_by_peer(s: socket.socket, timeout: float) -> bool:
    s.settimeout(timeout)
    try:
        return s.recv(65535) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def answered(host: str, port: int, source: str) -> bool:
    s = connect(host, port, source)
    try:
        s.sendall(options(host, port, s))
        s.settimeout(5)
        return s.recv(65535).startswith(b"SIP/2.0 200")
    except OSError:
        return False
    finally:
        s.close()


def main() -> None:
    host, port, cap, idle = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    out: dict = {}
    held = [connect(host, port, "127.0.0.1") for _ in range(cap)]
    time.sleep(0.3)
    extra = connect(host, port, "127.0.0.1")
    out["over_cap_closed"] = closed_by_peer(extra, 2.0)
    out["other_source_answered"] = answered(host, port, "127.0.0.2")
    start = time.monotonic()
    out["held_closed"] = sum(closed_by_peer(s, idle * 4) for s in held)
    out["idle_waited"] = time.monotonic() - start
    out["same_source_after"] = answered(host, port, "127.0.0.1")
    for s in held + [extra]:
        s.close()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
