"""Sending DTMF keys to a leg: RFC 4733 events when `telephone-event` was negotiated,
else in-band Q.23 tones. Used by <Play digits>, the vendor `send_digits` command and
anything else that dials keys.

RFC 4733 timing (one for every front-end): a key of D ms is one event, all of whose
packets carry the event's start timestamp. Packets go every 20 ms (the packet time);
each carries the duration up to the end of the 20 ms it stands for: the first (marker
bit) 160 samples, then 320, 480, ... The packet whose duration reaches D*8 samples
is the end packet (E bit), and, as RFC 4733 2.5.1.4 asks, the final packet is sent
a total of three times at the update interval, identical (same timestamp, same
duration). The next key starts `gap` ms after this one's D ms, and never sooner
than 20 ms after its last end packet. While keys are sent the leg's audio is held
(a prompt pauses, it is not dropped), so no audio packet interleaves with an
event; the next audio packet starts a new talkspurt (marker bit).
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable

from ext import rtp

from ext.dtmf_py import COLS, DBM0_AMPLITUDE, KEYS, ROWS

EVENTS = "0123456789*#ABCD"    # RFC 4733 3.2: the event code is the index here
PAUSE = "W"                    # a pause of PAUSE_MS, as in dial strings
PAUSE_MS = 500
DURATION_MS = 100
GAP_MS = 60
FRAME = 160                    # samples in one 20 ms packet at 8 kHz
VOLUME = 10                    # RFC 4733 2.3.4: -10 dBm0
TONE_DBM0 = -10.0              # in-band: each of the two tones


def valid(digits: str, pause: bool = True) -> bool:
    """True when every character is a DTMF key (or, with `pause`, a W/w pause)."""
    allowed = EVENTS + (PAUSE if pause else "")
    return bool(digits) and all(c in allowed for c in digits.upper())


def rfc4733(ch) -> bool:
    """Whether keys go to this channel's far end as RFC 4733 events."""
    return ch.stream.dtmf_pt >= 0


def tones(digits: str, duration_ms: int = DURATION_MS, gap_ms: int = GAP_MS):
    """In-band DTMF as 8 kHz PCM (int16): each key a Q.23 pair at -10 dBm0 per tone
    for `duration_ms`, then `gap_ms` of silence; W is a pause of PAUSE_MS."""
    import numpy as np

    amp = DBM0_AMPLITUDE * 10 ** (TONE_DBM0 / 20)
    t = np.arange(duration_ms * 8) / 8000.0
    parts = [np.zeros(0)]
    for c in digits.upper():
        if c == PAUSE:
            parts.append(np.zeros(PAUSE_MS * 8))
            continue
        i = KEYS.index(c)
        parts.append(amp * (np.sin(2 * np.pi * ROWS[i // 4] * t) +
                            np.sin(2 * np.pi * COLS[i % 4] * t)))
        parts.append(np.zeros(gap_ms * 8))
    return np.concatenate(parts).astype(np.int16)


async def send_events(ch, digits: str, duration_ms: int = DURATION_MS, gap_ms: int = GAP_MS,
                      active: Callable[[], bool] | None = None) -> None:
    """Send `digits` as RFC 4733 events out of channel `ch` (see the module docstring).
    `active()` returning False stops between packets (control has left)."""
    stream = ch.stream
    saved = ch.source
    ch.source = rtp.SOURCE_NONE    # the player (if any) pauses; it is not dropped
    total = duration_ms * 8
    try:
        for c in digits.upper():
            if active is not None and not active():
                return
            if c == PAUSE:
                await asyncio.sleep(PAUSE_MS / 1000)
                continue
            code = EVENTS.index(c)
            dur = 0
            first = True
            while True:
                dur = min(total, dur + FRAME)
                end = dur >= total
                stream.send_event(code, dur, end, first, VOLUME)
                first = False
                if end:
                    break
                await asyncio.sleep(0.02)
            for _ in range(2):     # RFC 4733 2.5.1.4: the final packet, three times in all
                await asyncio.sleep(0.02)
                stream.send_event(code, total, True, False, VOLUME)
            await asyncio.sleep(max(gap_ms - 20, 20) / 1000)
    finally:
        if ch.source == rtp.SOURCE_NONE:
            ch.source = saved
        if stream.mode == rtp.MODE_TERMINATE:   # not relayed by a bridge since
            stream.terminate()   # the next audio packet starts a talkspurt (marker bit)
