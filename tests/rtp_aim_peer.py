"""A caller that tries to aim the engine's RTP at a third party, run inside a
loopback-only network namespace (`ip netns exec NAME python tests/rtp_aim_peer.py`).

    rtp_aim_peer.py ENGINE_HOST:PORT NUMBER VICTIM_IP [SOURCE_IP]

It imports nothing from the engine. From SOURCE_IP (default 127.0.0.1: the caller, "A") it sends
an INVITE whose SDP names VICTIM_IP ("B", an address of the namespace with a
socket listening), never acknowledges the 200, and counts what B receives
while A sends nothing; then A sends RTP from its own socket and it counts
what comes back to A and what B still gets. One JSON document on stdout.
"""
from __future__ import annotations

import json
import secrets
import socket
import struct
import sys
import time


def invite(src: str, host: str, port: int, sip_port: int, number: str, victim: str,
           rtp_port: int) -> bytes:
    sdp = (f"v=0\r\no=- 1 1 IN IP4 {victim}\r\ns=-\r\nc=IN IP4 {victim}\r\nt=0 0\r\n"
           f"m=audio {rtp_port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n")
    branch = "z9hG4bK" + secrets.token_hex(6)
    return (f"INVITE sip:{number}@{host}:{port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {src}:{sip_port};branch={branch};rport\r\n"
            f"Max-Forwards: 70\r\n"
            f"From: <sip:mallory@{src}>;tag={secrets.token_hex(4)}\r\n"
            f"To: <sip:{number}@{host}>\r\n"
            f"Call-ID: {secrets.token_hex(8)}@{src}\r\n"
            f"CSeq: 1 INVITE\r\n"
            f"Contact: <sip:mallory@{src}:{sip_port}>\r\n"
            f"Content-Type: application/sdp\r\n"
            f"Content-Length: {len(sdp)}\r\n\r\n{sdp}").encode()


def count(sock: socket.socket, seconds: float) -> int:
    n = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sock.settimeout(max(0.01, end - time.monotonic()))
        try:
            sock.recv(2048)
            n += 1
        except (TimeoutError, socket.timeout):
            pass
    return n


def main() -> int:
    host, _, port = sys.argv[1].rpartition(":")
    number, victim = sys.argv[2], sys.argv[3]
    src = sys.argv[4] if len(sys.argv) > 4 else "127.0.0.1"
    sip = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sip.bind((src, 0))
    a_rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    a_rtp.bind((src, 0))
    b_rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b_rtp.bind((victim, 0))
    # The victim is reachable at all (else zero packets would prove nothing).
    a_rtp.sendto(b"probe", b_rtp.getsockname())
    b_rtp.settimeout(1.0)
    reachable = b_rtp.recv(64) == b"probe"
    sip.sendto(invite(src, host, int(port), sip.getsockname()[1], number, victim,
                      b_rtp.getsockname()[1]), (host, int(port)))
    sip.settimeout(5.0)
    status, body = 0, b""
    while status < 200:
        data = sip.recv(65535)
        status = int(data.split(b" ", 2)[1])
        body = data.partition(b"\r\n\r\n")[2]
    media_port = int(body.split(b"m=audio ")[1].split()[0])
    to_b_before = count(b_rtp, 2.0)
    # A now sends RTP from its own socket: the engine may answer there.
    seq = 1
    to_a = 0
    end = time.monotonic() + 1.5
    a_rtp.settimeout(0.02)
    while time.monotonic() < end:
        a_rtp.sendto(struct.pack("!BBHII", 0x80, 0, seq, 160 * seq, 0x1234) + b"\xff" * 160,
                     (host, media_port))
        seq += 1
        try:
            while True:
                a_rtp.recv(2048)
                to_a += 1
        except (TimeoutError, socket.timeout, BlockingIOError):
            pass
    to_b_after = count(b_rtp, 0.5)
    print(json.dumps({"status": status, "victim_reachable": reachable,
                      "to_victim_before": to_b_before, "to_caller": to_a,
                      "to_victim_after": to_b_after}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
