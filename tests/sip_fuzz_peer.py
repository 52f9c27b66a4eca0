"""Mutation fuzzing of a running engine's SIP ports, run inside a loopback-only
network namespace (`ip netns exec NAME python tests/sip_fuzz_peer.py ...`).

    sip_fuzz_peer.py udp|tcp HOST:PORT SEED COUNT

Valid requests (INVITE with SDP, OPTIONS, BYE, REGISTER, ACK, CANCEL, INFO, to
every demo number) are mutated: octets deleted, replaced and inserted (CRLFs,
NULs, octets that are not UTF-8, huge numbers, header fragments), and sent as
datagrams or, over TCP, cut into random segments on connections that are
opened and torn down at random. It starts once OPTIONS over UDP and TCP are
answered, and every 200 messages they must still be. Prints one JSON line; exits 1 when the engine stopped answering.
It imports nothing from the engine.
"""
from __future__ import annotations

import json
import random
import socket
import sys
import time

NUMBERS = ("1000", "1001", "1002", "2000", "3000", "4000", "5100", "5200", "5300", "6100",
           "7100", "agent1", "9999")
METHODS = ("INVITE", "INVITE", "OPTIONS", "BYE", "REGISTER", "ACK", "CANCEL", "INFO")
SDP = (b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
       b"m=audio %d RTP/AVP 0 8 101\r\na=rtpmap:101 telephone-event/8000\r\n"
       b"a=fmtp:101 0-16\r\n")
# Media ports at and past the edges (65535 leaves no RTCP port), as well as ordinary ones.
PORTS = (40000, 40000, 40000, 40000, 65535, 65534, 0, 1, 65536, 99999)
TOKENS = (b"\x00", b"\r\n", b"\r\n\r\n", b" ", b";", b":", b"<", b">", b"\"", b"%", b"@", b",",
          b"=", b"\t", b"99999999999", b"-1", b"0", b"SIP/2.0", b"z9hG4bK", b"\xff\xfe",
          b"\xc3\x28", b"\xed\xa0\x80", b"\xc2\xb2", b"a" * 3000, b"[::1]", b"IN IP6 ::1",
          b"Content-Length: 5000\r\n", b"l: 7\r\n", b"c=IN IP4 media.example.com\r\n",
          b"a=rtcp:65536\r\n", b"a=rtcp:0\r\n", b"65535")


def request(rng, k: int, port: int, me: int, transport: str) -> bytes:
    method = rng.choice(METHODS)
    number = rng.choice(NUMBERS)
    body = SDP % rng.choice(PORTS) if method == "INVITE" else b""
    head = (f"{method} sip:{number}@127.0.0.1:{port} SIP/2.0\r\n"
            f"Via: SIP/2.0/{transport} 127.0.0.1:{me};branch=z9hG4bKfz{k};rport\r\n"
            f"Max-Forwards: 70\r\nFrom: \"Fuzz\" <sip:fz@127.0.0.1>;tag=f{k}\r\n"
            f"To: <sip:{number}@127.0.0.1>\r\nCall-ID: fz{k}@127.0.0.1\r\nCSeq: 1 {method}\r\n"
            f"Contact: <sip:fz@127.0.0.1:{me}>\r\n")
    if body:
        head += "Content-Type: application/sdp\r\n"
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def mutate(rng, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randrange(1, 6)):
        i = rng.randrange(len(b) + 1)
        op = rng.randrange(4)
        if op == 0 and len(b) > 1:
            del b[i:i + rng.randrange(1, 20)]
        elif op == 1:
            b[i:i] = rng.choice(TOKENS)
        elif op == 2 and i < len(b):
            b[i] = rng.randrange(256)
        else:
            j = rng.randrange(len(b) + 1)
            b[i:i] = b[j:j + rng.randrange(1, 40)]
    return bytes(b)


def options(port: int, me: int, transport: str, tag: str) -> bytes:
    return (f"OPTIONS sip:1000@127.0.0.1:{port} SIP/2.0\r\n"
            f"Via: SIP/2.0/{transport} 127.0.0.1:{me};branch=z9hG4bKalive{tag}\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:fz@127.0.0.1>;tag=a{tag}\r\n"
            f"To: <sip:1000@127.0.0.1>\r\nCall-ID: alive{tag}@127.0.0.1\r\nCSeq: 1 OPTIONS\r\n"
            "Content-Length: 0\r\n\r\n").encode()


def alive(port: int, tag: str) -> bool:
    """An OPTIONS over UDP and one over a new TCP connection are both answered 200."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(0.5)
        ok = False
        for attempt in range(4):
            s.sendto(options(port, s.getsockname()[1], "UDP", f"{tag}u{attempt}"),
                     ("127.0.0.1", port))
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and not ok:
                try:
                    data = s.recv(65535)
                except socket.timeout:
                    break
                ok = data.startswith(b"SIP/2.0 200") and f"alive{tag}u".encode() in data
            if ok:
                break
        if not ok:
            return False
    with socket.create_connection(("127.0.0.1", port), timeout=3) as t:
        t.sendall(options(port, t.getsockname()[1], "TCP", f"{tag}t"))
        return t.recv(65535).startswith(b"SIP/2.0 200")


def run_udp(rng, port: int, count: int) -> dict:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    me = s.getsockname()[1]
    for k in range(count):
        s.sendto(mutate(rng, request(rng, k, port, me, "UDP")), ("127.0.0.1", port))
        while True:                     # what comes back is read and dropped
            try:
                s.recv(65535)
            except BlockingIOError:
                break
        if k % 200 == 199 and not alive(port, str(k)):
            return {"dead_after": k}
    return {}


def run_tcp(rng, port: int, count: int) -> dict:
    conns: list = []
    for k in range(count):
        if not conns or rng.random() < 0.2:
            conns.append(socket.create_connection(("127.0.0.1", port), timeout=2))
        c = rng.choice(conns)
        data = mutate(rng, request(rng, k, port, c.getsockname()[1], "TCP"))
        try:
            while data:
                cut = rng.randrange(1, len(data) + 1)
                c.sendall(data[:cut])
                data = data[cut:]
            if rng.random() < 0.1:
                conns.remove(c)
                c.close()
        except OSError:                 # the engine closed a stream it could not frame
            conns.remove(c)
            c.close()
        if len(conns) > 30:
            conns.pop(0).close()
        if k % 200 == 199 and not alive(port, str(k)):
            return {"dead_after": k}
    for c in conns:
        c.close()
    return {}


def main() -> int:
    mode, hostport, seed, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    port = int(hostport.rsplit(":", 1)[1])
    rng = random.Random(seed)
    deadline = time.monotonic() + 20     # the engine is up when both transports answer
    while True:
        try:
            if alive(port, "start"):
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            print(json.dumps({"error": "the engine never answered OPTIONS"}))
            return 1
        time.sleep(0.2)
    result = (run_udp if mode == "udp" else run_tcp)(rng, port, count)
    if "dead_after" not in result:
        time.sleep(0.5)
        result["alive_at_end"] = alive(port, "end")
    result.update(mode=mode, seed=seed, sent=count)
    print(json.dumps(result))
    return 0 if result.get("alive_at_end") else 1


if __name__ == "__main__":
    sys.exit(main())
