"""SDP offer/answer for audio (RFC 4566, RFC 3264): PCMU, PCMA, telephone-event."""
from __future__ import annotations

import itertools
import socket
import time

from engine.sip.errors import SdpError

# Static payload types we can carry (RFC 3551 table 4).
STATIC = {0: ("PCMU", 8000), 8: ("PCMA", 8000)}
SUPPORTED = ("PCMU", "PCMA")
DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")
_ANSWER_DIRECTION = {"sendrecv": "sendrecv", "sendonly": "recvonly",
                     "recvonly": "sendonly", "inactive": "inactive"}
_session_ids = itertools.count(int(time.time()))


def _digits(s: str) -> bool:
    """ASCII digits only (str.isdigit also takes '²' and other digits int() refuses)."""
    return s.isascii() and s.isdigit()


class MediaDescription:
    __slots__ = ("media", "port", "proto", "formats", "rtpmap", "fmtp", "direction",
                 "address", "ptime", "rtcp_port")

    def __init__(self, media, port, proto, formats):
        self.media = media
        self.port = port
        self.rtcp_port = None       # a=rtcp (RFC 3605), else port + 1 (RFC 3550 11)
        self.proto = proto
        self.formats = formats
        self.rtpmap = {}
        self.fmtp = {}
        self.direction = None
        self.address = None
        self.ptime = None


class SessionDescription:
    """The parts of an SDP body that audio offer/answer needs."""

    __slots__ = ("origin", "address", "media", "direction")

    def __init__(self):
        self.origin = ""
        self.address = None
        self.media = []
        self.direction = "sendrecv"


def parse(body: bytes) -> SessionDescription:
    """Parse an SDP body; raises SdpError (answered with 400/488) when unusable."""
    # Every field read here is ASCII; free text (s=, i=, a=tool...) may come in another
    # charset (RFC 8866 6.10) from older equipment and is carried, not refused.
    text = body.decode("utf-8", "surrogateescape")
    sd = SessionDescription()
    current = None
    saw_version = False
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line[1:2] != "=":
            raise SdpError(f"malformed SDP line {line[:40]!r}")
        kind = line[0]
        # Attribute lines are most of a body: they are tested first.
        if kind == "a":
            name, _, arg = line[2:].partition(":")
            if name in DIRECTIONS:
                if current is None:
                    sd.direction = name
                else:
                    current.direction = name
            elif current is None:
                continue
            elif name == "rtpmap":
                pt, _, enc = arg.partition(" ")
                if _digits(pt):
                    bits = enc.split("/")
                    rate = int(bits[1]) if len(bits) > 1 and _digits(bits[1]) else 8000
                    current.rtpmap[int(pt)] = (bits[0], rate)
            elif name == "fmtp":
                pt, _, params = arg.partition(" ")
                if _digits(pt):
                    current.fmtp[int(pt)] = params
            elif name == "rtcp":
                port = arg.split(" ", 1)[0]
                if not _digits(port) or not 1 <= int(port) <= 65535:
                    raise SdpError("bad RTCP port")
                current.rtcp_port = int(port)
            elif name == "ptime" and _digits(arg) and 10 <= int(arg) <= 120:
                current.ptime = int(arg)   # others: the default 20 ms
        elif kind == "m":
            parts = line[2:].split()
            if len(parts) < 4:
                raise SdpError("malformed m= line")
            port = parts[1].split("/")[0]
            if not _digits(port) or int(port) > 65535:
                raise SdpError("bad media port")
            current = MediaDescription(parts[0], int(port), parts[2], parts[3:])
            sd.media.append(current)
        elif kind == "c":
            parts = line[2:].split()
            if len(parts) != 3 or parts[0] != "IN" or parts[1] not in ("IP4", "IP6"):
                raise SdpError("malformed c= line")
            addr = parts[2].split("/")[0]
            if current is None:
                sd.address = addr
            else:
                current.address = addr
        elif kind == "v":
            saw_version = True
            if line[2:] != "0":
                raise SdpError("unsupported SDP version")
        elif kind == "o":
            sd.origin = line[2:]
    if not saw_version:
        raise SdpError("SDP without v= line")
    return sd


class Negotiated:
    """Result of answering an offer: what the audio stream uses."""

    __slots__ = ("remote_addr", "remote_port", "payload_type", "codec", "dtmf_pt",
                 "direction", "hold", "ptime")

    def __init__(self):
        self.remote_addr = None
        self.remote_port = 0
        self.payload_type = 0
        self.codec = "PCMU"
        self.dtmf_pt = None
        self.direction = "sendrecv"
        self.hold = False
        self.ptime = 20


def _check_address(addr) -> None:
    """The audio stream's c= address must be an IP literal: RFC 8866 allows a domain
    name there, but media is never sent to a name the engine would have to resolve."""
    if addr is None:
        raise SdpError("no c= line for the audio stream")
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in addr else socket.AF_INET, addr)
    except (OSError, ValueError):
        raise SdpError(f"c= address {addr!r} is not an IP address") from None


def negotiate(offer: SessionDescription, prefer=SUPPORTED):
    """Pick the audio stream and codec. Returns (Negotiated, index of the audio m-line).

    Raises SdpError when no audio stream has a codec in common (answered 488)."""
    for index, m in enumerate(offer.media):
        if m.media != "audio" or m.port == 0 or not m.proto.startswith("RTP/AVP"):
            continue
        chosen = None
        dtmf = None
        for fmt in m.formats:
            if not _digits(fmt):
                continue
            pt = int(fmt)
            enc = m.rtpmap.get(pt) or STATIC.get(pt)
            if enc is None:
                continue
            name = enc[0].upper()
            if name == "TELEPHONE-EVENT" and enc[1] == 8000 and dtmf is None:
                dtmf = pt
            elif chosen is None and name in prefer and enc[1] == 8000:
                chosen = (pt, name)
        if chosen is None:
            continue
        n = Negotiated()
        n.remote_addr = m.address or offer.address
        _check_address(n.remote_addr)
        # RFC 3550 11: RTCP goes to the next port up; an RTP port of 65535 leaves
        # none, and media is never sent to a port that does not exist.
        if (m.rtcp_port or m.port + 1) > 65535:
            raise SdpError("RTCP port out of range")
        n.remote_port = m.port
        n.payload_type, n.codec = chosen
        n.dtmf_pt = dtmf
        direction = m.direction or offer.direction
        # RFC 3264 8.4: c=0.0.0.0 (RFC 2543 hold) or sendonly/inactive put us on hold.
        n.hold = direction in ("sendonly", "inactive") or n.remote_addr in ("0.0.0.0", "::")
        n.direction = _ANSWER_DIRECTION[direction]
        if m.ptime:
            n.ptime = m.ptime
        return n, index
    raise SdpError("no common audio codec")


def build(address: str, port: int, neg: Negotiated | None, session_id: int, version: int,
          offer: SessionDescription | None = None, audio_index: int = 0) -> bytes:
    """Build an answer (when `offer` is given: one m-line per offered one, the
    others rejected with port 0, RFC 3264 6) or a fresh offer (neg None)."""
    ipver = "IP6" if ":" in address else "IP4"
    lines = [
        "v=0",
        f"o=baton {session_id} {version} IN {ipver} {address}",
        "s=baton",
        f"c=IN {ipver} {address}",
        "t=0 0",
    ]
    if neg is None:
        lines += [f"m=audio {port} RTP/AVP 0 8 101",
                  "a=rtpmap:0 PCMU/8000", "a=rtpmap:8 PCMA/8000",
                  "a=rtpmap:101 telephone-event/8000", "a=fmtp:101 0-16",
                  "a=ptime:20", "a=sendrecv"]
        return ("\r\n".join(lines) + "\r\n").encode()
    media = offer.media if offer is not None else [None]
    for index, m in enumerate(media):
        if m is not None and index != audio_index:
            lines.append(f"m={m.media} 0 {m.proto} {' '.join(m.formats)}")
            continue
        fmts = str(neg.payload_type)
        if neg.dtmf_pt is not None:
            fmts += f" {neg.dtmf_pt}"
        lines.append(f"m=audio {port} RTP/AVP {fmts}")
        lines.append(f"a=rtpmap:{neg.payload_type} {neg.codec}/8000")
        if neg.dtmf_pt is not None:
            lines.append(f"a=rtpmap:{neg.dtmf_pt} telephone-event/8000")
            lines.append(f"a=fmtp:{neg.dtmf_pt} 0-16")
        lines.append(f"a=ptime:{neg.ptime}")
        lines.append(f"a={neg.direction}")
    return ("\r\n".join(lines) + "\r\n").encode()


def new_session_id() -> int:
    return next(_session_ids)
