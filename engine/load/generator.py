"""The load generator: places calls at a rate (ramped), keeps at most `concurrent`
up, runs each call's scenario, and keeps what every call measured.

One uvloop reactor drives everything, as in the engine: Baton's SIP core (its UAC,
`engine/sip/uac.py`) and the media engine (one RtpHub, one 20 ms MediaClock).
"""
from __future__ import annotations

import asyncio
import bisect
import collections
import math
import time
from dataclasses import dataclass

from engine.load.call import CallRecord, LoadCall
from engine.load.scenario import uses_inband_detection
from engine.media.engine import MediaEngine
from engine.media.ports import PortPool
from engine.sip import build, sdp
from engine.sip.core import SipCore
from engine.sip.transaction import Flow, client_key


class TargetError(Exception):
    """The target cannot be reached or named (the message says which)."""


@dataclass
class Options:
    rate: float = 10.0
    calls: int | None = 100
    duration: float | None = None
    concurrent: int = 1000
    hold: float = 5.0
    ramp: float = 0.0
    max_call: float = 60.0
    local_host: str = "127.0.0.1"
    rtp_ports: tuple = (40000, 49999)
    media_to: str | None = None         # send RTP to this address instead of the SDP's
    probe: bool = True
    probe_timeout: float = 3.0


@dataclass
class Target:
    request_uri: str
    destination: tuple                  # (host, port) the INVITEs go to
    transport: str                      # UDP or TCP
    credentials: tuple | None = None
    from_domain: str = ""


class Histogram:
    """Counts per bucket (`counts[i]`: values in (bounds[i-1], bounds[i]]) plus those above
    the last bound, their number and sum: what a Prometheus histogram is made of."""

    def __init__(self, bounds: tuple):
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.count = 0
        self.total = 0.0

    def add(self, value: float) -> None:
        i = bisect.bisect_left(self.bounds, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.count += 1
        self.total += value


PDD_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MOS_BOUNDS = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 3.75, 4.0, 4.1, 4.2, 4.3, 4.4, 4.5)


class Tally:
    """The run so far, kept as each call ends (the Prometheus view of `baton load`)."""

    def __init__(self):
        self.codes: collections.Counter = collections.Counter()
        self.answered = 0
        self.pdd = Histogram(PDD_BOUNDS)
        self.mos = Histogram(MOS_BOUNDS)
        self.rtp_sent = self.rtp_received = self.rtp_expected = self.rtp_lost = 0
        self.slips = 0

    def add(self, rec: CallRecord) -> None:
        self.codes[str(rec.code or rec.error or "none")] += 1
        if rec.answered:
            self.answered += 1
            if rec.t200 is not None:
                self.pdd.add(rec.t200 / 1000.0)
            if rec.mos is not None:
                self.mos.add(rec.mos)
        self.rtp_sent += rec.rtp_sent
        self.rtp_received += rec.rtp_received
        self.rtp_expected += rec.rtp_expected
        self.rtp_lost += rec.rtp_lost
        self.slips += rec.slips


def due_time(i: int, rate: float, ramp: float) -> float:
    """When call `i` (from 0) is due: the rate rises linearly over `ramp` seconds,
    then holds. Under the ramp n(t) = rate t^2 / (2 ramp)."""
    if ramp <= 0:
        return i / rate
    in_ramp = rate * ramp / 2.0
    if i < in_ramp:
        return math.sqrt(2.0 * ramp * i / rate)
    return ramp + (i - in_ramp) / rate


class LoadGenerator:
    def __init__(self, target: Target, scenario, opts: Options, view=None):
        self.target = target
        self.scenario = scenario
        self.opts = opts
        self.view = view
        self.request_uri = target.request_uri
        self.destination = target.destination
        self.transport = target.transport
        self.credentials = target.credentials
        self.local_host = opts.local_host
        self.inband = uses_inband_detection(scenario)
        self.sdp_id = sdp.new_session_id()
        self.records: list[CallRecord] = []
        self.tally = Tally()
        self.active: dict[int, asyncio.Task] = {}
        self.offered = 0
        self.started = 0
        self.behind = 0.0                   # how late the last launch was, s
        self.stopping = False
        self.interrupted = False
        self.samples: list[tuple] = []      # (t, started, ended, concurrent) once a second
        self._wavs: dict = {}
        self.loop = None
        self.core = None
        self.media = None
        self.ports = None
        self.t_start = 0.0
        self.wall_start = 0.0               # time.time() at t_start: calls' times in wall time
        self.t_end = 0.0

    # -- what calls ask of the generator ------------------------------------------------
    def media_address(self, sdp_address: str) -> str:
        return self.opts.media_to or sdp_address

    def wav(self, path: str):
        pcm = self._wavs.get(path)
        if pcm is None:
            from engine.media import wav

            pcm = self._wavs[path] = wav.read_wav(path)
        return pcm

    # -- what the SIP core asks of its application ----------------------------------------
    def on_invite(self, dialog) -> None:
        dialog.reject(403, reason="Load Generator")

    @property
    def from_uri(self) -> str:
        return f"<sip:load@{self.target.from_domain or self.local_host}>"

    # -- running ------------------------------------------------------------------------
    async def open(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.core = SipCore(self, user_agent="Baton-load")
        transports = ("udp", "tcp") if self.transport == "TCP" else ("udp",)
        await self.core.listen(self.local_host, 0, transports)
        self.media = MediaEngine(self.loop)
        self.media.start()
        lo, hi = self.opts.rtp_ports
        self.ports = PortPool(self.local_host, lo, hi)

    async def close(self) -> None:
        if self.media is not None:
            self.media.stop()
        if self.ports is not None:
            self.ports.close()
        if self.core is not None:
            self.core.close()

    async def probe(self) -> int:
        """OPTIONS to the target: any response proves it is there. Returns the status."""
        core = self.core
        host, port = self.destination
        flow = core.tcp[0].flow_to((host, port)) if self.transport == "TCP" \
            else Flow(core.udp[0], (host, port))
        branch = build.new_branch()
        h = [("via", f"SIP/2.0/{flow.transport.name} {core.sent_by(flow)};branch={branch};rport"),
             ("max-forwards", "70"), ("from", f"{self.from_uri};tag={build.new_tag()}"),
             ("to", f"<{self.request_uri}>"), ("call-id", f"{build.new_tag()}@baton-load"),
             ("cseq", "1 OPTIONS"), ("contact", core.contact_for(flow)),
             ("accept", "application/sdp")]
        got: asyncio.Future = self.loop.create_future()

        def on_response(ct, msg):
            if not got.done():
                got.set_result(msg)

        core.transactions.new_client(client_key(branch, "OPTIONS"), flow,
                                     build.request("OPTIONS", self.request_uri, h), False,
                                     on_response)
        try:
            msg = await asyncio.wait_for(got, self.opts.probe_timeout)
        except asyncio.TimeoutError:
            msg = None
        if msg is None:
            raise TargetError(f"no answer to OPTIONS from {host}:{port} over {self.transport} "
                              f"within {self.opts.probe_timeout:g} s (is the target up?)")
        return msg.status

    def stop(self) -> None:
        """Ctrl-C: place no more calls and end the ones up (BYE, or CANCEL)."""
        if self.stopping:
            return
        self.stopping = True
        self.interrupted = True
        for task in list(self.active.values()):
            task.cancel()

    async def run(self) -> None:
        opts = self.opts
        self.t_start = time.monotonic()
        self.wall_start = time.time()
        self.loop.call_soon(self._sample)
        total = opts.calls if opts.calls is not None else math.inf
        i = 0
        while not self.stopping and i < total:
            now = time.monotonic() - self.t_start
            if opts.duration is not None and now >= opts.duration:
                break
            due = due_time(i, opts.rate, opts.ramp)
            if due > now:
                await asyncio.sleep(min(due - now, 0.05))
                continue
            # Several due calls are launched in one wake-up; the lag is what we could not keep.
            while i < total and due_time(i, opts.rate, opts.ramp) <= now and not self.stopping:
                if len(self.active) >= opts.concurrent:
                    break
                self.offered += 1
                self.behind = now - due_time(i, opts.rate, opts.ramp)
                self._launch(i)
                i += 1
            if len(self.active) >= opts.concurrent:
                await asyncio.sleep(0.005)
            else:
                await asyncio.sleep(0)
        self.launch_end = time.monotonic() - self.t_start
        while self.active:
            await asyncio.wait(list(self.active.values()))
        self.t_end = time.monotonic() - self.t_start

    def _launch(self, i: int) -> None:
        call = LoadCall(self, i)
        task = self.loop.create_task(call.run())
        self.active[i] = task
        self.started += 1
        task.add_done_callback(lambda t, i=i, c=call: self._done(i, c))

    def _done(self, i: int, call: LoadCall) -> None:
        self.active.pop(i, None)
        self.records.append(call.rec)
        self.tally.add(call.rec)

    def _sample(self) -> None:
        if self.t_end:
            return
        t = time.monotonic() - self.t_start
        self.samples.append((round(t, 3), self.started, len(self.records), len(self.active)))
        if self.view is not None:
            self.view(self)
        self.loop.call_later(1.0, self._sample)

    @property
    def achieved_rate(self) -> float:
        """Calls started per second of placing them (the whole run once it stopped placing)."""
        window = getattr(self, "launch_end", None) or self.elapsed
        return self.started / window if window >= 0.5 else 0.0

    @property
    def elapsed(self) -> float:
        return (self.t_end or (time.monotonic() - self.t_start)) if self.t_start else 0.0
