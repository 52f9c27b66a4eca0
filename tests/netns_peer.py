"""A raw SIP peer for over-the-wire conformance tests, run inside a network
namespace (`ip netns exec NAME python tests/netns_peer.py ...`).

It imports nothing from the engine: it judges the engine's bytes with its own
minimal reading of RFC 3261 section 7, so a parser bug cannot hide itself.

    netns_peer.py probe HOST:PORT [TIMEOUT]
        Send OPTIONS until a 200 arrives; exit 0 (and print it as JSON) or 1.
    netns_peer.py send HOST:PORT FILE...
        Bind UDP 127.0.0.1:5060 and 127.0.0.1:5050, send each file's bytes as
        one datagram from 5060, collect what arrives on either port, and
        print one JSON document with everything that came back.
"""
from __future__ import annotations

import json
import os
import secrets
import select
import socket
import struct
import sys
import time

LISTEN_PORTS = (5060, 5050)
WAIT_FOR_FINAL = 1.0   # how long a message may take to be answered at all
LINGER = 0.2           # after a final answer: catch duplicates or extra answers
AFTER_ALL = 1.2        # at the end: late retransmissions (Timer G is 0.5 s)
ETH_P_IP = 0x0800
PACKET_OUTGOING = 4


def parse(data: bytes) -> dict:
    """Start line and header fields (unfolded, raw names) of one message."""
    text = data.decode("latin-1")
    head, sep, body = text.partition("\r\n\r\n")
    lines = head.split("\r\n")
    fields = []
    for ln in lines[1:]:
        if ln[:1] in (" ", "\t") and fields:
            fields[-1][1] += " " + ln.strip()
            continue
        name, _, value = ln.partition(":")
        fields.append([name.strip(), value.strip()])
    start = lines[0]
    out = {"start": start, "headers": fields, "body_len": len(body), "status": None,
           "reason": None}
    if start.startswith("SIP/2.0 "):
        parts = start.split(" ", 2)
        if parts[1].isdigit():
            out["status"] = int(parts[1])
            out["reason"] = parts[2] if len(parts) > 2 else ""
    return out


def header(msg: dict, *names: str):
    for name, value in msg["headers"]:
        if name.lower() in names:
            return value
    return None


def ack_for(request: bytes, response: dict) -> bytes | None:
    """RFC 3261 17.1.1.3: the ACK of a non-2xx final answer to an INVITE, so the
    engine's INVITE server transaction stops retransmitting (Timer G) and
    the next message's window stays clean."""
    ruri = request.split(b"\r\n", 1)[0].split(b" ")
    if len(ruri) < 2:
        return None
    via = header(response, "via", "v")
    if via is None:
        return None
    # The top Via of the request: the answer's, without what the engine added.
    via = ";".join(p for p in via.split(";")
                   if not p.strip().lower().startswith(("received=", "rport=")))
    cseq = (header(response, "cseq") or "").split()
    if not cseq:
        return None
    lines = [f"ACK {ruri[1].decode('latin-1')} SIP/2.0", f"Via: {via}", "Max-Forwards: 70"]
    for names, label in ((("from", "f"), "From"), (("to", "t"), "To"),
                         (("call-id", "i"), "Call-ID")):
        v = header(response, *names)
        if v is not None:
            lines.append(f"{label}: {v}")
    lines += [f"CSeq: {cseq[0]} ACK", "Content-Length: 0"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def sniffer():
    """A packet socket on lo: every datagram the engine sends, wherever to."""
    try:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
        s.bind(("lo", ETH_P_IP))
        s.setblocking(False)
        return s
    except (OSError, AttributeError):
        return None


def sniffed(pkt: bytes, engine_port: int):
    """(proto, src, dst) of an IPv4 UDP packet from the engine's port or a TCP SYN."""
    if len(pkt) < 20 or pkt[0] >> 4 != 4:
        return None
    ihl = (pkt[0] & 0x0F) * 4
    proto = pkt[9]
    src = socket.inet_ntoa(pkt[12:16])
    dst = socket.inet_ntoa(pkt[16:20])
    if len(pkt) < ihl + 14:
        return None
    sport, dport = struct.unpack("!HH", pkt[ihl:ihl + 4])
    if proto == 17 and sport == engine_port:
        return {"proto": "udp", "src": [src, sport], "dst": [dst, dport]}
    if proto == 6:
        flags = pkt[ihl + 13]
        if flags & 0x02 and not flags & 0x10:   # SYN without ACK: a new connection
            return {"proto": "tcp", "src": [src, sport], "dst": [dst, dport]}
    return None


def isolation() -> dict:
    """What happens to a datagram for somewhere other than loopback."""
    out = {"interfaces": [name for _, name in socket.if_nameindex()]}
    for label, addr, bcast in (("documentation", ("192.0.2.1", 5060), False),
                               ("broadcast", ("255.255.255.255", 5060), True)):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            if bcast:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            try:
                s.sendto(b"x", addr)
                out[label] = "sent"
            except OSError as exc:
                out[label] = f"{type(exc).__name__}: {exc.strerror}"
    return out


def options(host: str, port: int, local_port: int) -> tuple[bytes, str]:
    call_id = "probe." + secrets.token_hex(8)
    data = (f"OPTIONS sip:{host}:{port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{local_port};branch=z9hG4bK{secrets.token_hex(6)}\r\n"
            f"Max-Forwards: 70\r\nTo: <sip:{host}:{port}>\r\n"
            f"From: <sip:probe@127.0.0.1:{local_port}>;tag={secrets.token_hex(4)}\r\n"
            f"Call-ID: {call_id}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")
    return data.encode(), call_id


def probe(host: str, port: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(0.2)
        while time.monotonic() < deadline:
            data, call_id = options(host, port, s.getsockname()[1])
            try:
                s.sendto(data, (host, port))
                got = s.recv(65535)
            except OSError:   # not listening yet (ICMP refused) or no answer
                continue
            msg = parse(got)
            if msg["status"] == 200 and header(msg, "call-id", "i") == call_id:
                print(json.dumps(msg))
                return 0
    return 1


def send_all(host: str, port: int, paths: list) -> dict:
    socks = {}
    for p in LISTEN_PORTS:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", p))
        s.setblocking(False)
        socks[s] = p
    sender = next(s for s, p in socks.items() if p == 5060)
    sniff = sniffer()
    result = {"isolation": isolation(), "sniffer": sniff is not None, "files": {},
              "after": [], "packets": []}

    def collect(until: float, got: list, request: bytes | None, settle: bool) -> None:
        deadline = until
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            rlist = list(socks) + ([sniff] if sniff else [])
            ready, _, _ = select.select(rlist, [], [], left)
            for s in ready:
                if s is sniff:
                    while True:
                        try:
                            pkt, addr = s.recvfrom(70000)
                        except BlockingIOError:
                            break
                        if addr[2] == PACKET_OUTGOING:
                            continue   # lo shows each packet twice
                        info = sniffed(pkt, port)
                        if info:
                            result["packets"].append(info)
                    continue
                data, src = s.recvfrom(70000)
                msg = parse(data)
                msg.update(port=socks[s], src=list(src),
                           t=round(time.monotonic() - t0, 4), raw=data.decode("latin-1"))
                got.append(msg)
                status = msg["status"]
                if status is not None and status >= 200:
                    cseq = (header(msg, "cseq") or "").split()
                    if request is not None and status >= 300 and cseq[-1:] == ["INVITE"]:
                        ack = ack_for(request, msg)
                        if ack:
                            sender.sendto(ack, (host, port))
                            msg["acked"] = True
                    if settle:
                        deadline = min(deadline, time.monotonic() + LINGER)

    for path in paths:
        name = os.path.splitext(os.path.basename(path))[0]
        with open(path, "rb") as f:
            data = f.read()
        got = []
        t0 = time.monotonic()
        sender.sendto(data, (host, port))
        collect(t0 + WAIT_FOR_FINAL, got, data, settle=True)
        result["files"][name] = {"sent": len(data), "received": got}
    t0 = time.monotonic()
    collect(t0 + AFTER_ALL, result["after"], None, settle=False)
    for s in socks:
        s.close()
    if sniff:
        sniff.close()
    return result


def main(argv: list) -> int:
    mode, target = argv[1], argv[2]
    host, _, port = target.rpartition(":")
    if mode == "probe":
        return probe(host, int(port), float(argv[3]) if len(argv) > 3 else 10.0)
    if mode == "send":
        json.dump(send_all(host, int(port), argv[3:]), sys.stdout)
        return 0
    print(f"unknown mode {mode!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
