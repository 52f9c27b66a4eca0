"""Minimal RTCP (RFC 3550 6.4): sender reports out, receiver reports in.

RTCP is a few packets per stream every few seconds, so it is plain Python
run from one periodic job over all streams, never per RTP packet.
"""
from __future__ import annotations

import struct
import time

NTP_EPOCH_OFFSET = 2208988800  # seconds from 1900 to 1970
SR = 200
RR = 201


def ntp_now() -> tuple[int, int]:
    t = time.time() + NTP_EPOCH_OFFSET
    sec = int(t)
    return sec, int((t - sec) * (1 << 32))


def sender_report(stats: dict, rx_ssrc: int | None, last_sr: tuple | None) -> bytes:
    """An SR with one reception report block when we receive from the far end."""
    sec, frac = ntp_now()
    blocks = b""
    count = 0
    if rx_ssrc and stats["expected"] > 0:
        count = 1
        lost = min(stats["lost"], 0x7FFFFF)
        fraction = min(255, int(256 * stats["lost"] / stats["expected"])) if stats["expected"] else 0
        lsr, dlsr = 0, 0
        if last_sr is not None:
            ntp_mid, received_at = last_sr
            lsr = ntp_mid
            dlsr = int((time.monotonic() - received_at) * 65536) & 0xFFFFFFFF
        ext_seq = stats.get("ext_seq", 0) & 0xFFFFFFFF
        jitter = int(stats["jitter_ms"] * 8) & 0xFFFFFFFF
        blocks = struct.pack("!IB3sIIII", rx_ssrc, fraction, lost.to_bytes(3, "big"),
                             ext_seq, jitter, lsr, dlsr)
    length = (24 + len(blocks)) // 4  # in 32-bit words minus one: header 4 + 24 sender info
    header = struct.pack("!BBH", 0x80 | count, SR, length)
    info = struct.pack("!IIIIII", stats["ssrc"], sec, frac, stats["ts"] & 0xFFFFFFFF,
                       stats["tx_packets"] & 0xFFFFFFFF, stats["tx_bytes"] & 0xFFFFFFFF)
    return header + info + blocks


def parse(data: bytes) -> dict:
    """Reception report blocks and SR timing from a (compound) RTCP packet.

    Returns {"reports": [{"ssrc", "fraction_lost", "cumulative_lost", "jitter"}],
    "sr_ntp_mid": int | None}. Malformed input yields what parsed before it."""
    out = {"reports": [], "sr_ntp_mid": None}
    off = 0
    n = len(data)
    while off + 4 <= n:
        b0, pt, length = struct.unpack_from("!BBH", data, off)
        if b0 >> 6 != 2:
            break
        end = off + 4 * (length + 1)
        if end > n:
            break
        count = b0 & 0x1F
        body = off + 4
        if pt == SR and body + 24 <= end:
            _ssrc, sec, frac = struct.unpack_from("!III", data, body)
            out["sr_ntp_mid"] = ((sec & 0xFFFF) << 16) | (frac >> 16)
            body += 24
        elif pt == RR and body + 4 <= end:
            body += 4
        else:
            off = end
            continue
        for _ in range(count):
            if body + 24 > end:
                break
            ssrc, fraction, lost3, _ext, jitter, _lsr, _dlsr = struct.unpack_from(
                "!IB3sIIII", data, body)
            lost = int.from_bytes(lost3, "big", signed=True)
            out["reports"].append({"ssrc": ssrc, "fraction_lost": fraction / 256.0,
                                   "cumulative_lost": lost, "jitter": jitter})
            body += 24
        off = end
    return out
