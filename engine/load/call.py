"""One load call: Baton's UAC places it, the media clock carries its audio, the
scenario (an app of caller-side modules) runs on it, and its figures are kept."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

from engine.load import emodel
from engine.media.commands import digits as dtmf_digits
from engine.media.ports import PortsExhausted
from engine.sessions.apps import HANGUP
from engine.sip import sdp
from engine.sip.errors import SdpError
from engine.sip.uac import OutgoingCall, UacOwner
from ext.kernels import rtp

RATE = 8000
FRAME = 160
POLL = 0.04                       # how often a waiting step looks at what it heard
# After the call ends the stream stops sending but listens this long before its figures are
# read: a packet the path reordered behind the last one heard is still on its way, not lost
# (RFC 3550 counts loss against the highest sequence number seen).
LINGER = 0.25
PLAYOUT_FRAMES = 2                # the generator's jitter buffer: 40 ms of received audio
PROBE_SECONDS = 0.4


def probe_signal() -> np.ndarray:
    """The echo-check signal: 0.4 s of seeded noise, the same in every call."""
    rng = np.random.default_rng(4733)
    return (rng.standard_normal(int(PROBE_SECONDS * RATE)) * 3000).clip(-12000, 12000) \
        .astype(np.int16)


PROBE = probe_signal()


@dataclass
class CallRecord:
    """What one call measured. Times are ms from the INVITE; None when it did not happen."""
    index: int
    started: float = 0.0                 # s since the run began
    t100: float | None = None
    t180: float | None = None
    t200: float | None = None
    code: int = 0
    answered: bool = False
    planned_s: float = 0.0
    duration_s: float | None = None
    ended_by: str = ""                   # local, remote, stopped
    rtp_sent: int = 0
    rtp_received: int = 0
    rtp_expected: int = 0
    rtp_lost: int = 0
    rtp_reordered: int = 0
    rtp_duplicate: int = 0
    jitter_ms: float | None = None
    delay_ms: float | None = None        # one-way, from the echo's round trip
    audio: str = ""                      # two-way, one-way, none
    r_factor: float | None = None
    mos: float | None = None
    dtmf_sent: str = ""
    dtmf_detected: str = ""
    echo_correlation: float | None = None
    prompts_heard: int = 0
    outcome: str = ""                    # the scenario's path: node:outlet, ...
    codec: str = ""
    late_ticks: int = 0                  # generator media ticks skipped while the call had media
    slips: int = 0                       # frames heard as silence (the packet came after our
                                         # tick) or dropped (over two queued): 20 ms slips
    error: str = ""
    path: list = field(default_factory=list)

    @property
    def loss_pct(self) -> float | None:
        if self.rtp_expected <= 0:
            return None
        return 100.0 * self.rtp_lost / self.rtp_expected


class LoadCall(UacOwner):
    """The UAC owner and dialog owner of one call, and the runner of its scenario."""

    def __init__(self, gen, index: int):
        self.gen = gen
        self.rec = CallRecord(index=index, started=time.monotonic() - gen.t_start,
                              planned_s=gen.opts.hold)
        self.final: asyncio.Future = gen.loop.create_future()
        self.ended = asyncio.Event()
        self.call: OutgoingCall | None = None
        self.ports = None
        self.stream = None
        self.ch = None
        self.late0 = 0
        self.t0 = 0.0
        self.t_answer = 0.0
        self.digits_heard: list[str] = []
        self.digit_event = asyncio.Event()
        self.play_done = asyncio.Event()

    # -- SIP -------------------------------------------------------------------
    def _ms(self) -> float:
        return (time.monotonic() - self.t0) * 1000.0

    def call_trying(self, call, msg) -> None:
        self.rec.t100 = self._ms()

    def call_progress(self, call, status, msg) -> None:
        if self.rec.t180 is None and status in (180, 183):
            self.rec.t180 = self._ms()

    def call_answered(self, call, msg) -> None:
        self.rec.t200 = self._ms()
        self.rec.code = msg.status
        self.t_answer = time.monotonic()
        if call.dialog is not None:
            call.dialog.owner = self
        if not self.final.done():
            self.final.set_result(msg)

    def call_failed(self, call, status, msg) -> None:
        self.rec.code = status
        if msg is None:
            # RFC 3261 8.1.3.1: a timeout (408) or a transport failure (503) of our own.
            self.rec.error = "timeout" if status == 408 else f"no response ({status})"
        if not self.final.done():
            self.final.set_result(None)

    def dialog_confirmed(self, dialog) -> None:
        pass

    def dialog_terminated(self, dialog, reason: str) -> None:
        if reason == "bye":
            self.rec.ended_by = self.rec.ended_by or "remote"
        self.ended.set()

    def dialog_reoffer(self, dialog, body: bytes) -> bytes:
        # A re-INVITE (hold, a new address): answer with our stream, follow its address.
        neg, index = sdp.negotiate(sdp.parse(body))
        if self.stream is not None and neg.remote_addr and neg.remote_port:
            self.stream.set_remote(self.gen.media_address(neg.remote_addr), neg.remote_port)
        return sdp.build(self.gen.local_host, self.ports.port, neg, self.gen.sdp_id,
                         2, sdp.parse(body), index)

    def dialog_request(self, dialog, msg) -> int:
        return 200

    # -- media -----------------------------------------------------------------
    def media_event(self, ch_id, kind, detail) -> None:
        if kind == "dtmf":
            self.digits_heard.append(detail)
            self.digit_event.set()
        elif kind == "play-done":
            self.play_done.set()

    def _start_media(self, answer: bytes) -> None:
        neg, _ = sdp.negotiate(sdp.parse(answer))
        self.rec.codec = neg.codec
        media = self.gen.media
        self.stream = media.stream(self.ports.rtp, neg.payload_type, neg.dtmf_pt)
        # Jitter timed by the kernel's receive stamps: a busy generator adds none.
        self.stream.use_kernel_timestamps()
        # What it hears goes through a small jitter buffer, as a phone's does: a frame
        # a few ms late (either side's clock, or the path) is played, not lost.
        self.stream.playout = PLAYOUT_FRAMES
        self.stream.set_remote(self.gen.media_address(neg.remote_addr), neg.remote_port)
        if self.gen.opts.media_to:
            # Through a relay: latching onto the far end's own address (RFC 4961) would
            # go around it, so only what comes from the relay is taken.
            self.stream.symmetric = False
        self.ch = media.channel(self.stream, self)
        self.ch.silence()           # a continuous stream from the answer on: loss is measurable
        self.late0 = media.late_ticks
        if self.gen.inband:
            self.ch.detect_dtmf(True)

    def _record(self, seconds: float):
        buf = np.zeros(int(seconds * RATE) + FRAME, dtype=np.int16)
        self.ch.recorder = rtp.Recorder(buf)
        return self.ch.recorder

    # -- the call --------------------------------------------------------------
    async def run(self) -> CallRecord:
        gen, rec = self.gen, self.rec
        try:
            try:
                self.ports = gen.ports.allocate()
            except PortsExhausted:
                rec.error = "no free RTP port"
                return rec
            offer = sdp.build(gen.local_host, self.ports.port, None, gen.sdp_id, 1)
            self.call = OutgoingCall(gen.core, gen.request_uri, from_uri=gen.from_uri,
                                     to_uri=f"<{gen.request_uri}>", sdp=offer,
                                     destination=gen.destination, transport=gen.transport,
                                     credentials=gen.credentials, owner=self)
            self.t0 = time.monotonic()
            await self.call.start()
            msg = await self.final
            if msg is None:
                return rec
            rec.answered = True
            if not (msg.body or b"").strip():
                # A 200 with no SDP answer (a stateless responder, signalling only): the
                # call is up without media; the report says so (audio none), and steps
                # that need media end the scenario with `no-media`.
                rec.audio = "none"
                await self._run_scenario()
                return rec
            try:
                self._start_media(msg.body)
            except SdpError as exc:
                rec.error = f"SDP answer: {exc}"
                self.call.hangup()
                rec.ended_by = "local"
                return rec
            await self._run_scenario()
            await self._linger()
            return rec
        except asyncio.CancelledError:
            rec.ended_by = rec.ended_by or "stopped"
            if self.call is not None:
                self.call.hangup()
            if not rec.answered and not rec.code:
                rec.error = "stopped before an answer"
            return rec
        finally:
            self._finish()

    async def _run_scenario(self) -> None:
        rec = self.rec
        app = self.gen.scenario
        node = app.nodes[app.start]
        limit = self.gen.opts.max_call
        try:
            await asyncio.wait_for(self._walk(node), limit)
        except asyncio.TimeoutError:
            rec.path.append("max-call")
        if not self.ended.is_set():
            rec.ended_by = rec.ended_by or "local"
            self.call.hangup()
        else:
            rec.ended_by = rec.ended_by or "remote"

    async def _linger(self) -> None:
        """Stop sending (the dialog is over), keep receiving for LINGER, then let
        _finish read the figures."""
        if self.t_answer:
            self.rec.duration_s = time.monotonic() - self.t_answer
        if self.ch is None:
            return
        self.rec.late_ticks = self.gen.media.late_ticks - self.late0
        self.ch.recorder = None
        self.gen.media.drop_channel(self.ch)
        self.ch = None
        await asyncio.sleep(LINGER)

    async def _walk(self, node) -> None:
        while node is not None and not self.ended.is_set():
            step = STEPS[node.module]
            if self.ch is None and node.module not in NO_MEDIA_STEPS:
                self.rec.path.append(f"{node.name}:no-media")
                return
            outlet = await _until_ended(self, step(self, node.params))
            if outlet is None:
                self.rec.path.append(f"{node.name}:ended")
                return
            self.rec.path.append(f"{node.name}:{outlet}")
            target = node.outlets.get(outlet, HANGUP)
            node = None if target == HANGUP else node.app.nodes[target]

    def _finish(self) -> None:
        rec = self.rec
        if self.t_answer and rec.duration_s is None:
            rec.duration_s = time.monotonic() - self.t_answer
        if self.stream is not None:
            st = self.stream.stats()
            rec.rtp_sent = st["tx_packets"]
            rec.rtp_received = st["rx_packets"]
            rec.rtp_expected = st["expected"]
            rec.rtp_duplicate = st.get("duplicate", 0)
            rec.rtp_reordered = st.get("reordered", 0)
            rec.slips = st.get("underruns", 0) + st.get("trimmed", 0)
            # Duplicates are not deliveries: lost = expected - distinct packets received.
            rec.rtp_lost = max(st["expected"] - (st["rx_packets"] - rec.rtp_duplicate), 0)
            rec.jitter_ms = round(st["jitter_ms"], 3) if st["rx_packets"] > 1 else None
            rec.audio = ("two-way" if rec.rtp_sent and rec.rtp_received else
                         "one-way" if rec.rtp_sent or rec.rtp_received else "none")
            if rec.rtp_received:
                d = emodel.mouth_to_ear(rec.delay_ms or 0.0, rec.jitter_ms or 0.0)
                rec.r_factor = round(emodel.r_factor(rec.loss_pct or 0.0, d, rec.codec), 2)
                rec.mos = round(emodel.mos(rec.r_factor), 3)
            if self.ch is not None:
                # A skipped tick sent nothing and heard nothing: this call's audio has a
                # hole the generator made, not the target (the media figures are suspect).
                rec.late_ticks = self.gen.media.late_ticks - self.late0
                self.ch.recorder = None
                self.gen.media.drop_channel(self.ch)
            self.gen.media.release(self.stream)
        rec.dtmf_detected = "".join(self.digits_heard)
        rec.outcome = " ".join(rec.path)
        if self.ports is not None:
            self.ports.release()


async def _until_ended(call: LoadCall, coro):
    """Run a step; None when the far end hung up first."""
    step = asyncio.ensure_future(coro)
    ended = asyncio.ensure_future(call.ended.wait())
    try:
        await asyncio.wait((step, ended), return_when=asyncio.FIRST_COMPLETED)
    finally:
        ended.cancel()
    if step.done():
        return step.result()
    step.cancel()
    return None


# -- the caller-side modules ---------------------------------------------------------
async def step_hold(call: LoadCall, p: dict) -> str:
    seconds = float(p.get("seconds", call.gen.opts.hold))
    await asyncio.sleep(max(seconds - (time.monotonic() - call.t_answer), 0)
                        if "seconds" not in p else seconds)
    return "done"


async def step_play(call: LoadCall, p: dict) -> str:
    if p.get("probe"):
        pcm = PROBE
    elif "wav" in p:
        pcm = call.gen.wav(p["wav"])
    else:
        t = np.arange(int(float(p.get("seconds", 1.0)) * RATE)) / RATE
        pcm = (8000 * np.sin(2 * np.pi * float(p.get("tone", 1000)) * t)).astype(np.int16)
    call.play_done.clear()
    call.ch.play(rtp.Player(pcm))
    await call.play_done.wait()
    return "done"


def _frame_energy(samples: np.ndarray) -> np.ndarray:
    n = len(samples) // FRAME
    if n == 0:
        return np.zeros(0)
    return np.abs(samples[:n * FRAME].astype(np.int32)).reshape(n, FRAME).mean(axis=1)


def _tonal(samples: np.ndarray) -> bool:
    """Most of the energy in one narrow band: a tone, not speech or noise."""
    spec = np.abs(np.fft.rfft(samples.astype(np.float64))) ** 2
    total = spec.sum()
    if total <= 0:
        return False
    k = int(spec.argmax())
    return spec[max(k - 2, 0):k + 3].sum() / total > 0.6


async def step_wait(call: LoadCall, p: dict) -> str:
    what = p.get("for", "speech")
    timeout = float(p.get("timeout", 10))
    need = max(int(p.get("min_ms", 200 if what != "silence" else 500)) // 20, 1)
    threshold = int(p.get("threshold", 300))
    recorder = call._record(timeout)
    deadline = time.monotonic() + timeout
    heard_before = False
    try:
        while time.monotonic() < deadline:
            await asyncio.sleep(POLL)
            energy = _frame_energy(np.asarray(recorder.samples()))
            if len(energy) < need:
                continue
            tail = energy[-need:]
            if what == "silence":
                heard_before = heard_before or bool((energy > threshold).any())
                if (tail < threshold).all():
                    return "heard"
            elif (tail >= threshold).all():
                if what == "speech":
                    call.rec.prompts_heard += 1
                    return "heard"
                if _tonal(np.asarray(recorder.samples())[-need * FRAME:]):
                    return "heard"
        return "timeout"
    finally:
        call.ch.recorder = None


async def step_digits(call: LoadCall, p: dict) -> str:
    keys = str(p.get("digits", ""))
    duration = int(p.get("duration_ms", dtmf_digits.DURATION_MS))
    gap = int(p.get("gap_ms", dtmf_digits.GAP_MS))
    call.rec.dtmf_sent += keys.upper().replace(dtmf_digits.PAUSE, "")
    if p.get("inband") or not dtmf_digits.rfc4733(call.ch):
        call.play_done.clear()
        call.ch.play(rtp.Player(dtmf_digits.tones(keys, duration, gap)))
        await call.play_done.wait()
    else:
        await dtmf_digits.send_events(call.ch, keys, duration, gap)
    return "done"


async def step_expect_digits(call: LoadCall, p: dict) -> str:
    """`matched` once the keys heard contain `digits`; at the timeout `mismatch` when
    other keys came, `timeout` when none did."""
    want = str(p.get("digits", "")).upper()
    deadline = time.monotonic() + float(p.get("timeout", 5))
    while want not in "".join(call.digits_heard):
        left = deadline - time.monotonic()
        if left <= 0:
            return "mismatch" if call.digits_heard else "timeout"
        call.digit_event.clear()
        try:
            await asyncio.wait_for(call.digit_event.wait(), left)
        except asyncio.TimeoutError:
            pass
    return "matched"


async def step_echo_check(call: LoadCall, p: dict) -> str:
    """Play the probe, record what comes back, find it by cross-correlation: the
    lag is the round trip (one-way delay = half of it), the peak how alike it is."""
    seconds = float(p.get("seconds", 1.6))
    recorder = call._record(seconds)
    call.play_done.clear()
    call.ch.play(rtp.Player(PROBE))
    try:
        while not recorder.full:
            await asyncio.sleep(POLL)
        heard = np.asarray(recorder.samples()).astype(np.float64)
    finally:
        call.ch.recorder = None
    lag, rho = correlate(heard, PROBE.astype(np.float64))
    call.rec.echo_correlation = round(rho, 3)
    if rho < float(p.get("min_correlation", 0.5)):
        return "fail"
    # The round trip heard includes our own jitter buffer's delay: not the path's.
    rtt_ms = lag / RATE * 1000.0 - PLAYOUT_FRAMES * FRAME / RATE * 1000.0
    call.rec.delay_ms = round(max(rtt_ms, 0.0) / 2.0, 1)
    return "pass"


def correlate(heard: np.ndarray, probe: np.ndarray) -> tuple[int, float]:
    """(lag in samples, normalised correlation at that lag) of `probe` inside `heard`."""
    n = len(heard) + len(probe)
    size = 1 << (n - 1).bit_length()
    xc = np.fft.irfft(np.fft.rfft(heard, size) * np.conj(np.fft.rfft(probe, size)), size)
    xc = xc[:len(heard) - len(probe) + 1] if len(heard) >= len(probe) else xc[:1]
    lag = int(np.argmax(xc))
    window = heard[lag:lag + len(probe)]
    norm = np.sqrt((window ** 2).sum() * (probe ** 2).sum())
    return lag, float(xc[lag] / norm) if norm > 0 else 0.0


async def step_hangup(call: LoadCall, p: dict):
    return "hangup"


NO_MEDIA_STEPS = ("load.hold", "load.hangup")
STEPS = {"load.hold": step_hold, "load.play": step_play, "load.wait": step_wait,
         "load.digits": step_digits, "load.expect_digits": step_expect_digits,
         "load.echo_check": step_echo_check, "load.hangup": step_hangup}
