"""The media engine: RTP streams, the relay and the 20 ms media clock on the engine's loop.

One epoll fd (the Cython `RtpHub`) carries every RTP socket, so the event
loop sees one reader however many calls there are. One drift-free timer
(absolute deadlines) drives every terminating channel through
`MediaClock.tick()`. The tick encodes every channel's frame and hands the
batch to the clock's sender thread (in the kernel, without the GIL), so the
loop is back to SIP and the control API while the frames are being sent.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time

from ext.kernels import rtp

log = logging.getLogger("baton.media")

PTIME = 0.020
# Below this many channels a tick sends its frames itself (well under a millisecond): the
# sender thread's wake-up, late on a busy machine, would only jitter them.
SEND_THREAD_MIN = 128
LAW_OF_PT = {0: rtp.LAW_ULAW, 8: rtp.LAW_ALAW}


class MediaEngine:
    def __init__(self, loop: asyncio.AbstractEventLoop, inactivity_timeout: float = 60.0,
                 hold_timeout: float = 3600.0, send_thread: bool = True):
        self.loop = loop
        self.hub = rtp.RtpHub()
        self.clock = rtp.MediaClock(send_thread=send_thread)
        self.clock.send_thread_min = SEND_THREAD_MIN
        self.inactivity_timeout = inactivity_timeout
        self.hold_timeout = hold_timeout
        self._ids = itertools.count(1)
        self.channels: dict[int, object] = {}      # channel id -> owner (event sink)
        self._handle = None
        self._start = 0.0
        self._n = 0
        self.late_ticks = 0
        self.watch: dict[int, object] = {}          # id(stream) -> owner for inactivity checks
        self._inactivity_handle = None
        self.rtcp: dict[int, list] = {}             # id(stream) -> [stream, rtcp socket, owner, last SR]
        self.rtcp_interval = 5.0
        self._rtcp_handle = None
        self._faulted: set = set()                  # sessions (or streams) whose fault was logged
        self.streams: dict[int, object] = {}        # id(stream) -> live stream (for /metrics)
        # Counters of released streams, so totals never go back when a call ends.
        self.retired = {"rx_packets": 0, "tx_packets": 0, "rx_bytes": 0, "tx_bytes": 0,
                        "lost": 0, "expected": 0, "slips": 0, "streams": 0}

    def start(self) -> None:
        self.loop.add_reader(self.hub.fd, self.hub.poll)
        self._start = self.loop.time()
        self._n = 0
        self._handle = self.loop.call_at(self._start + PTIME, self._tick)
        self._inactivity_handle = self.loop.call_later(1.0, self._check_inactivity)
        self._rtcp_handle = self.loop.call_later(self.rtcp_interval, self._rtcp)

    def stop(self) -> None:
        if self._rtcp_handle is not None:
            self._rtcp_handle.cancel()
            self._rtcp_handle = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._inactivity_handle is not None:
            self._inactivity_handle.cancel()
            self._inactivity_handle = None
        try:
            self.loop.remove_reader(self.hub.fd)
        except (RuntimeError, ValueError, OSError) as exc:    # the loop is closed already
            log.debug("media: RTP hub reader not removed: %s", exc)
        self.clock.close()
        self.hub.close()

    # -- streams and channels ----------------------------------------------------
    def stream(self, sock, payload_type: int = 0, dtmf_pt: int | None = None,
               rtcp_sock=None, owner=None):
        """`rtcp_sock`: the RTCP socket, or a callable that binds it (called once the
        far end's RTP has arrived: a call without media holds no RTCP socket)."""
        s = rtp.RtpStream(sock, payload_type, -1 if dtmf_pt is None else dtmf_pt)
        self.hub.add(s)
        self.streams[id(s)] = s
        if rtcp_sock is not None:
            self.rtcp[id(s)] = [s, rtcp_sock, owner, None]
        return s

    def release(self, stream) -> None:
        self.hub.remove(stream)
        if self.streams.pop(id(stream), None) is not None:
            st = stream.stats()
            r = self.retired
            for k in ("rx_packets", "tx_packets", "rx_bytes", "tx_bytes", "lost", "expected"):
                r[k] += st[k]
            r["slips"] += st.get("underruns", 0) + st.get("trimmed", 0)
            r["streams"] += 1
        self.watch.pop(id(stream), None)
        self.rtcp.pop(id(stream), None)

    def _rtcp(self) -> None:
        """RFC 3550 6.4: a sender report per stream, and read what the far ends reported."""
        from engine.media import rtcp

        self._rtcp_handle = self.loop.call_later(self.rtcp_interval, self._rtcp)
        for key, entry in list(self.rtcp.items()):
            try:
                self._rtcp_stream(rtcp, entry)
            except Exception:
                # One stream's fault stays its own: the others keep their reports.
                self._fault(key, entry[2], "RTCP")

    def _rtcp_stream(self, rtcp, entry: list) -> None:
        stream, sock, owner, _last_sr = entry
        if callable(sock):
            # Bound once the far end's RTP arrives: a call held without media (the far end
            # silent) keeps one descriptor, not two, however long it lasts.
            if not stream.rx_packets:
                return
            sock = sock()
            if sock is None:
                self.rtcp.pop(id(stream), None)    # the port is taken: no RTCP for this call
                return
            entry[1] = sock
        try:
            while True:
                data = sock.recv(2048)
                report = rtcp.parse(data)
                if report["sr_ntp_mid"] is not None:
                    entry[3] = (report["sr_ntp_mid"], time.monotonic())
                if report["reports"] and owner is not None:
                    owner.rtcp_report = report["reports"][0]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            return
        remote = stream.remote_addr
        # RFC 3550 11: RTCP on the next port up; a far end latched at 65535 has none.
        if remote is None or not 0 < remote[1] < 65535:
            return
        stats = stream.stats()
        if stats["tx_packets"] == 0:
            return
        try:
            sock.sendto(rtcp.sender_report(stats, stats["rx_ssrc"], entry[3]),
                        (remote[0], remote[1] + 1))
        except OSError:
            pass

    def _fault(self, key: int, owner, what: str) -> None:
        """A media callback raised: log it once per session (with its id), never
        into the loop, and keep the clock and every other stream running."""
        session = getattr(owner, "session", None)
        sid = getattr(session, "id", None)
        mark = sid if sid is not None else key
        if mark in self._faulted:
            return
        if len(self._faulted) >= 4096:
            self._faulted.clear()
        self._faulted.add(mark)
        if sid is None:
            log.error("%s failed (logged once)", what, exc_info=True)
        else:
            log.error("session %s: %s handler failed (logged once per session)", sid, what,
                      exc_info=True)

    def channel(self, stream, owner) -> "rtp.Channel":
        ch = rtp.Channel(next(self._ids), stream)
        stream.terminate()
        self.channels[ch.id] = owner
        self.clock.add(ch)
        return ch

    def drop_channel(self, ch) -> None:
        self.clock.remove(ch)
        self.channels.pop(ch.id, None)

    def watch_inactivity(self, stream, owner) -> None:
        """Tell `owner.media_inactive(stream)` when no RTP arrived for the timeout."""
        self.watch[id(stream)] = (stream, owner, time.monotonic_ns())

    # -- the clock -----------------------------------------------------------------
    def _tick(self) -> None:
        self._n += 1
        deadline = self._start + (self._n + 1) * PTIME
        now = self.loop.time()
        if now > deadline:
            # More than a whole frame late: skip ahead, count it, stay on the grid.
            missed = int((now - deadline) / PTIME) + 1
            self.late_ticks += missed
            self._n += missed
            deadline = self._start + (self._n + 1) * PTIME
        self._handle = self.loop.call_at(deadline, self._tick)
        try:
            events = self.clock.tick()
        except Exception:
            self._fault(-1, None, "media clock")
            return
        if events:
            for ch_id, kind, detail in events:
                owner = self.channels.get(ch_id)
                if owner is not None:
                    try:
                        owner.media_event(ch_id, kind, detail)
                    except Exception:
                        self._fault(ch_id, owner, f"media event ({kind})")

    def _check_inactivity(self) -> None:
        self._inactivity_handle = self.loop.call_later(1.0, self._check_inactivity)
        now = time.monotonic_ns()
        for key, (stream, owner, since) in list(self.watch.items()):
            last = max(stream.last_rx_ns, since)
            limit = self.hold_timeout if getattr(owner, "on_hold", False) else self.inactivity_timeout
            if now - last > limit * 1e9:
                self.watch.pop(key, None)
                try:
                    owner.media_inactive(stream)
                except Exception:
                    self._fault(key, owner, "RTP inactivity")
