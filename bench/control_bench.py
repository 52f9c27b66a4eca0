#!/usr/bin/env python3
"""The gRPC control API under load: command-to-media latency, vendor hand-off
time, and the message rate one Attach stream sustains.

Set-up: the engine runs in this process (uvloop). A second process (this
script with `--role client`) is the vendor: one SDK connection for module
`bench.play` and one for `bench.next`. SIPp places N long calls to number
7000, which the vendor takes, answers, and keeps busy with a play command
every few seconds: N concurrent vendor-controlled sessions.

Command-to-media latency. The client process also places P probe calls
(number 7001) from raw SIP/RTP sockets with kernel receive timestamps
(SO_TIMESTAMPNS). On each probe session it sends `play` of a 200 ms tone
(cached by the engine after the first), noting the wall and monotonic
clocks just before the command goes to the SDK; the probe socket notes
the kernel's arrival time of the first packet that is not silence after
that. Two figures come out:
- `wire`: vendor send -> first tone packet at the caller's socket. The
  media clock sends a frame every 20 ms, so this includes a 0-20 ms wait for
  the next tick that no control path can remove;
- `control`: vendor send -> the player attached to the caller's channel
  (the engine-side timestamp hook `ControlHub.trace`, same monotonic clock):
  gRPC, the stream, the dispatch, the command; the frame goes out on the
  next tick. A command that arrives while the loop runs a media tick (every
  channel's frame: milliseconds at hundreds of channels) waits for it, so
  the tick durations are recorded too (`media_tick`), and
  `control_less_media_ticks` is `control` minus the tick time that
  overlapped it.
Both clocks are the machine's (CLOCK_REALTIME for the kernel timestamps,
CLOCK_MONOTONIC for the hook), shared by the two processes.

Hand-off: calls to number 7002 run an app whose first node is `bench.play`
and whose `next` outlet is `bench.next`; the time is from vendor A sending
`release("next")` to vendor B holding control (its Take acknowledged), and
to B receiving the offer.

Stream rate: on one session, `set_value` commands with 256 in flight for a
few seconds; each command and each Ack is a message.

Prints one JSON line and writes bench/results/control-<timestamp>.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import selectors
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import wave
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import common  # noqa: E402

SECRET = "bench-vendor-secret-0123456789"
SILENT = frozenset((0xFF, 0x7F))
# Linux: receive timestamps in struct timespec (also the control message type).
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


def pct(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else None


def summary(values_ms: list[float]) -> dict:
    if not values_ms:
        return {"n": 0}
    return {"n": len(values_ms), "p50_ms": round(pct(values_ms, 0.50), 3),
            "p90_ms": round(pct(values_ms, 0.90), 3), "p99_ms": round(pct(values_ms, 0.99), 3),
            "max_ms": round(max(values_ms), 3),
            "mean_ms": round(sum(values_ms) / len(values_ms), 3)}


def write_tone(path: str, ms: int = 200) -> None:
    import numpy as np

    n = ms * 8
    pcm = (8000 * np.sin(2 * np.pi * 1000 * np.arange(n) / 8000)).astype("<i2")
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(pcm.tobytes())


# ---------------------------------------------------------------------------- the engine side
class TimedClock:
    """The media clock, with each tick's duration kept: a command that arrives while
    a tick runs waits for it, which is part of the latency's tail."""

    def __init__(self, clock):
        self._clock = clock
        self.spans: list[tuple[int, int]] = []     # (start, end) monotonic ns

    def tick(self):
        t0 = time.monotonic_ns()
        events = self._clock.tick()
        self.spans.append((t0, time.monotonic_ns()))
        return events

    @property
    def durations(self) -> list[float]:
        return [(b - a) / 1e6 for a, b in self.spans]

    def overlap_ms(self, start: int, end: int) -> float:
        """How much of [start, end] the media clock spent ticking."""
        import bisect

        i = max(0, bisect.bisect_left(self.spans, (start, 0)) - 1)
        total = 0
        while i < len(self.spans) and self.spans[i][0] < end:
            a, b = self.spans[i]
            total += max(0, min(b, end) - max(a, start))
            i += 1
        return total / 1e6

    def __getattr__(self, name):
        return getattr(self._clock, name)


def engine_config(data: str, sip_port: int) -> dict:
    return {
        "engine": {"sip_addr": f"127.0.0.1:{sip_port}", "grpc_addr": "127.0.0.1:0",
                   "data_dir": data, "log_level": "warning"},
        "media": {"address": "127.0.0.1", "rtp_port_min": 30000, "rtp_port_max": 42000,
                  "rtp_timeout": 600},
        # One SIPp source places every held call: not a flood from one caller.
        "security": {"max_setup_per_source": 0},
        "vendors": {"bench": {"secret": SECRET, "modules": ["bench.play", "bench.next"],
                              "offer_timeout": 5.0, "files_dir": data}},
        "modules": {"bench.play": {"vendor": "bench"}, "bench.next": {"vendor": "bench"}},
        "apps": {"handoff": {"start": "a", "nodes": {
            "a": {"module": "bench.play", "outlets": {"next": "b"}},
            "b": {"module": "bench.next"}}}},
        "accounts": {"bench": {"numbers": {"7000": {"module": "bench.play"},
                                           "7001": {"module": "bench.play"},
                                           "7002": {"app": "handoff"}}}},
    }


async def run_main(args) -> dict:
    from engine.config.load import from_dict
    from engine.runtime.server import Engine

    sip_port = common.free_port()
    data = tempfile.mkdtemp(prefix="baton-bench-")
    tone = os.path.join(data, "tone.wav")
    write_tone(tone)
    eng = Engine(from_dict(engine_config(data, sip_port), "<bench>"))
    await eng.start()
    if args.inline_send:
        eng.media.clock.close()    # the baseline: every tick sends its frames on the loop
    applied: dict[str, int] = {}
    eng.control.hub.trace = lambda what, sid, cid, t: applied.__setitem__(cid, t)
    ticks = TimedClock(eng.media.clock)
    eng.media.clock = ticks
    work = Path(tempfile.mkdtemp(prefix="baton-control-bench-"))
    out_file = work / "client.json"
    client_cmd = [sys.executable, __file__, "--role", "client",
                  "--engine", f"127.0.0.1:{eng.grpc_port}", "--sip", f"127.0.0.1:{sip_port}",
                  "--tone", tone, "--out", str(out_file), "--sessions", str(args.sessions),
                  "--probes", str(args.probes), "--plays", str(args.plays),
                  "--handoffs", str(args.handoffs), "--rate-seconds", str(args.rate_seconds)]
    client = await asyncio.create_subprocess_exec(
        *client_cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=open(work / "client.log", "wb"))
    sipp = None
    try:
        line = await asyncio.wait_for(client.stdout.readline(), 30)
        if not line.startswith(b"READY"):
            raise common.BenchError(f"client did not start: {line!r}\n"
                                    f"{common.log_tail(work / 'client.log')}")
        play = eng.control.hub.modules["bench.play"]
        rate = max(50, args.sessions // 5)
        sipp = common.spawn(
            [common.find_binary("sipp"), "-sn", "uac", f"127.0.0.1:{sip_port}", "-s", "7000",
             "-i", "127.0.0.1", "-p", str(common.free_port()), "-mi", "127.0.0.1",
             "-mp", str(common.free_port()), "-r", str(rate), "-m", str(args.sessions),
             "-l", str(args.sessions), "-d", "600000", "-max_socket", "4096", "-nostdin",
             "-timeout", "900s"], log=work / "sipp.log", cwd=work)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            held = sum(len(p.held) for p in play.processes)
            if held >= args.sessions:
                break
            await asyncio.sleep(0.1)
        held = sum(len(p.held) for p in play.processes)
        if held < args.sessions:
            raise common.BenchError(f"only {held} of {args.sessions} sessions taken")
        await asyncio.sleep(1.0)
        cpu0, late0, t0 = time.process_time(), eng.media.late_ticks, time.monotonic()
        ticks.spans.clear()
        client.stdin.write(b"go\n")
        await client.stdin.drain()
        line = await asyncio.wait_for(client.stdout.readline(), 300)
        if not line.startswith(b"DONE"):
            raise common.BenchError(f"client failed: {line!r}\n"
                                    f"{common.log_tail(work / 'client.log', 30)}")
        wall = time.monotonic() - t0
        engine_cpu = time.process_time() - cpu0
        late = eng.media.late_ticks - late0
        res = json.loads(out_file.read_text())
        measured = [p for p in res["plays"] if p["cid"] in applied]
        control = [(applied[p["cid"]] - p["send_mono"]) / 1e6 for p in measured]
        # The same, less the time the loop spent in media ticks meanwhile.
        beside = [(applied[p["cid"]] - p["send_mono"]) / 1e6 -
                  ticks.overlap_ms(p["send_mono"], applied[p["cid"]]) for p in measured]
        wire = [p["wire_ms"] for p in res["plays"] if p.get("wire_ms") is not None]
        missed = sum(1 for p in res["plays"] if p.get("wire_ms") is None)
        return {
            "bench": "control", "sessions": held, "send_thread": not args.inline_send,
            "probe_sessions": args.probes, "plays": len(res["plays"]),
            "plays_without_onset": missed,
            "command_to_media_control": summary(control),
            "command_to_media_control_less_media_ticks": summary(beside),
            "command_to_media_wire": summary(wire),
            "target_p99_ms": 5.0,
            "p99_under_target": {
                "control": bool(control) and pct(control, 0.99) < 5.0,
                "control_less_media_ticks": bool(beside) and pct(beside, 0.99) < 5.0},
            "handoff_release_to_taken": summary(res["handoff_taken_ms"]),
            "handoff_release_to_offer": summary(res["handoff_offer_ms"]),
            "stream_commands_per_s": res["rate"]["commands_per_s"],
            "stream_messages_per_s": res["rate"]["messages_per_s"],
            "stream_rate_window": res["rate"]["window"],
            "background_commands": res["background_commands"],
            "media_tick": summary(ticks.durations),
            "engine_cpu_s": round(engine_cpu, 2), "client_cpu_s": res["client_cpu_s"],
            "wall_s": round(wall, 2), "late_media_ticks": late,
            "machine": common.machine_info(),
        }
    finally:
        if client.returncode is None:
            client.kill()
            await client.wait()
        if sipp is not None:
            common.stop_process(sipp, timeout=3.0)
        await eng.stop(timeout=1.0)


# ---------------------------------------------------------------------------- the vendor side
class Probe:
    """A raw SIP caller whose media socket keeps kernel timestamps of tone onsets."""

    SDP = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
           "m=audio {port} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n"
           "a=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n")

    def __init__(self, sip: tuple[str, int], number: str, user: str):
        self.sip = sip
        self.number = number
        self.user = user
        self.sig = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sig.bind(("127.0.0.1", 0))
        self.sig.setblocking(False)
        self.media = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.media.bind(("127.0.0.1", 0))
        self.media.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.media.setblocking(False)
        self.onsets: list[int] = []      # kernel wall-clock ns of silence -> tone changes
        self.in_tone = False
        self.call_id = f"{os.urandom(6).hex()}@bench"
        self.tag = os.urandom(4).hex()
        self.to_tag = ""
        self.cseq = 1

    def _request(self, method: str, body: str = "") -> bytes:
        host, port = self.sip
        lp = self.sig.getsockname()[1]
        to = f"<sip:{self.number}@{host}:{port}>" + (f";tag={self.to_tag}" if self.to_tag else "")
        head = (f"{method} sip:{self.number}@{host}:{port} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 127.0.0.1:{lp};branch=z9hG4bK{os.urandom(6).hex()}\r\n"
                f"Max-Forwards: 70\r\nTo: {to}\r\n"
                f"From: <sip:{self.user}@127.0.0.1:{lp}>;tag={self.tag}\r\n"
                f"Call-ID: {self.call_id}\r\nCSeq: {self.cseq} {method}\r\n"
                f"Contact: <sip:{self.user}@127.0.0.1:{lp}>\r\n")
        if body:
            head += "Content-Type: application/sdp\r\n"
        return (head + f"Content-Length: {len(body)}\r\n\r\n" + body).encode()

    async def dial(self) -> None:
        loop = asyncio.get_running_loop()
        self.sig.sendto(self._request("INVITE", self.SDP.format(
            port=self.media.getsockname()[1])), self.sip)
        while True:
            data = await asyncio.wait_for(loop.sock_recv(self.sig, 65535), 15)
            status = int(data.split(b" ", 2)[1])
            if status >= 200:
                break
        if status != 200:
            raise RuntimeError(f"probe call got {status}")
        for line in data.split(b"\r\n"):
            if line.lower().startswith((b"to:", b"t:")) and b"tag=" in line:
                self.to_tag = line.split(b"tag=")[1].split(b";")[0].decode()
        self.sig.sendto(self._request("ACK"), self.sip)

    def bye(self) -> None:
        self.cseq += 1
        self.sig.sendto(self._request("BYE"), self.sip)

    def read(self) -> None:
        """Drain the media socket (called by the reader thread)."""
        while True:
            try:
                data, anc, _, _ = self.media.recvmsg(2048, socket.CMSG_SPACE(16))
            except (BlockingIOError, InterruptedError):
                return
            if len(data) < 13 or data[1] & 0x7F != 0:
                continue
            tone = any(b not in SILENT for b in data[12:])
            if tone and not self.in_tone:
                ts = None
                for level, kind, cdata in anc:
                    if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                        sec, nsec = struct.unpack("qq", cdata[:16])
                        ts = sec * 1_000_000_000 + nsec
                self.onsets.append(ts if ts is not None else time.time_ns())
            self.in_tone = tone


def reader_thread(probes: list[Probe], stop: threading.Event) -> None:
    sel = selectors.DefaultSelector()
    for p in probes:
        sel.register(p.media, selectors.EVENT_READ, p)
    while not stop.is_set():
        for key, _ in sel.select(0.05):
            key.data.read()


async def run_client(args) -> None:
    from control.sdk import ControlLost, VendorClient

    host, port = args.sip.rsplit(":", 1)
    sip = (host, int(port))
    a = VendorClient(args.engine, "bench.play", SECRET, instance="bench-a")
    b = VendorClient(args.engine, "bench.next", SECRET, instance="bench-b")
    background, probes_calls = {}, {}
    handoff: dict[str, dict] = {}
    stats = {"background_commands": 0}

    @a.on_offer
    async def on_a(offer) -> None:
        call = await offer.take()
        await call.answer()
        if offer.number == "7002":
            handoff[offer.session_id] = {"release": time.monotonic_ns()}
            await call.release("next")
        elif offer.number == "7001":
            probes_calls[str(offer.call_params.get("From", ""))] = call
        else:
            background[offer.session_id] = call

    @b.on_offer
    async def on_b(offer) -> None:
        t_offer = time.monotonic_ns()
        await offer.take()
        h = handoff.setdefault(offer.session_id, {})
        h["offer"], h["taken"] = t_offer, time.monotonic_ns()

    await a.start()
    await b.start()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print("READY", flush=True)
    await reader.readline()           # "go": the N background sessions are up
    cpu0 = time.process_time()

    # Background: every session gets a play now and then.
    running = True

    async def keep_busy() -> None:
        while running:
            calls = list(background.values())
            for call in calls:
                if not running:
                    return
                try:
                    await call.play(args.tone)
                    stats["background_commands"] += 1
                except ControlLost:
                    pass
                await asyncio.sleep(args.rate_seconds / max(1, len(calls)))

    busy = loop.create_task(keep_busy())
    probes = [Probe(sip, "7001", f"probe{i}") for i in range(args.probes)]
    stop = threading.Event()
    thread = threading.Thread(target=reader_thread, args=(probes, stop), daemon=True)
    thread.start()
    await asyncio.gather(*(p.dial() for p in probes))
    for _ in range(100):
        if len(probes_calls) == len(probes):
            break
        await asyncio.sleep(0.05)
    plays = []

    async def drive(p: Probe) -> None:
        call = next(c for k, c in probes_calls.items() if f"sip:{p.user}@" in k)
        for i in range(args.plays):
            await asyncio.sleep(random.uniform(0.08, 0.25))   # decorrelate from the tick
            cid = f"{p.user}-{i}"
            send_wall, send_mono = time.time_ns(), time.monotonic_ns()
            done = await call.play(args.tone, wait=True, command_id=cid)
            plays.append({"probe": p.user, "cid": cid, "send_wall": send_wall,
                          "send_mono": send_mono, "interrupted": done.interrupted})

    await asyncio.gather(*(drive(p) for p in probes))
    await asyncio.sleep(0.2)
    running = False
    busy.cancel()
    stop.set()
    thread.join(2)
    by_probe = {p.user: p for p in probes}
    for rec in plays:
        onsets = by_probe[rec["probe"]].onsets
        after = [t for t in onsets if t >= rec["send_wall"]]
        rec["wire_ms"] = (min(after) - rec["send_wall"]) / 1e6 if after else None

    # Hand-offs between the two vendors (calls to 7002, a few at a time).
    hprobes = [Probe(sip, "7002", f"handoff{i}") for i in range(args.handoffs)]
    for i in range(0, len(hprobes), 5):
        await asyncio.gather(*(p.dial() for p in hprobes[i:i + 5]))
    for _ in range(100):
        if sum(1 for h in handoff.values() if "taken" in h) >= args.handoffs:
            break
        await asyncio.sleep(0.05)
    taken_ms = [(h["taken"] - h["release"]) / 1e6 for h in handoff.values()
                if "taken" in h and "release" in h]
    offer_ms = [(h["offer"] - h["release"]) / 1e6 for h in handoff.values()
                if "offer" in h and "release" in h]
    for p in hprobes:
        p.bye()

    # The message rate of one Attach stream: set_value with a window in flight.
    call = next(iter(probes_calls.values()))
    window, seconds, done = 256, 3.0, [0]
    end = time.monotonic() + seconds

    async def worker(w: int) -> None:
        n = 0
        while time.monotonic() < end:
            await call.set_value("bench", n, command_id=f"rate-{w}-{n}")
            n += 1
            done[0] += 1

    t0 = time.monotonic()
    await asyncio.gather(*(worker(w) for w in range(window)))
    elapsed = time.monotonic() - t0
    for p in probes:
        p.bye()
    result = {"plays": plays, "handoff_taken_ms": taken_ms, "handoff_offer_ms": offer_ms,
              "rate": {"commands_per_s": round(done[0] / elapsed),
                       "messages_per_s": round(2 * done[0] / elapsed), "window": window},
              "background_commands": stats["background_commands"],
              "client_cpu_s": round(time.process_time() - cpu0, 2)}
    Path(args.out).write_text(json.dumps(result))
    print("DONE", flush=True)
    await a.close()
    await b.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--role", default="main", choices=("main", "client"))
    p.add_argument("--sessions", type=int, default=500, help="concurrent vendor-held sessions")
    p.add_argument("--probes", type=int, default=20, help="probe calls measuring latency")
    p.add_argument("--plays", type=int, default=25, help="play commands per probe call")
    p.add_argument("--handoffs", type=int, default=50, help="vendor A -> vendor B hand-offs")
    p.add_argument("--rate-seconds", type=float, default=5.0,
                   help="each background session gets a play this often")
    p.add_argument("--no-files", action="store_true", help="print only, write no result file")
    p.add_argument("--inline-send", action="store_true",
                   help="the media clock sends its frames on the event loop (no sender thread)")
    p.add_argument("--engine", help=argparse.SUPPRESS)
    p.add_argument("--sip", help=argparse.SUPPRESS)
    p.add_argument("--tone", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import uvloop

    if args.role == "client":
        # The probe reader is a thread: hand the GIL back quickly so that it never
        # delays the vendor's commands (5 ms by default).
        sys.setswitchinterval(float(os.environ.get("BENCH_CLIENT_SWITCH", "0.0002")))
        uvloop.run(run_client(args))
        return 0
    import logging

    # Sessions falling back when the client leaves at the end are expected, not news.
    logging.basicConfig(level=logging.ERROR)
    common.install_cleanup()
    if os.environ.get("BENCH_ENGINE_SWITCH"):
        sys.setswitchinterval(float(os.environ["BENCH_ENGINE_SWITCH"]))
    result = uvloop.run(run_main(args))
    if not args.no_files:
        jpath, _ = common.result_paths("control")
        result["json"] = str(jpath)
        common.write_json(jpath, result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
