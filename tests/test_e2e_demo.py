"""The demo config's multi-module flows end to end, with SIPp as the peers.

Each test runs a real `baton serve` on examples/demo.toml (or a copy of it
whose echo desk points at a SIPp UAS) and judges the outcome twice: from
the peer's side (SIPp's exit code and statistics, the RTP it received) and
from the engine's journal (`baton sessions list/history`), which records
every module that held each session and why control moved.

- 2000 -> menu, key 1 from an RFC 4733 pcap -> bridge into the engine's own
  echo (1001): a second session, the echo leg, must exist.
- the same with the desk on a SIPp UAS that hangs up first: the event
  `dialled-hangup` moves the caller to the survey prompt, then the engine
  sends the BYE.
- 1002 (a plain bridge to 1001) under load: every call is two sessions.
- the RTP the caller receives across menu -> bridge -> play is one stream:
  one SSRC, consecutive sequence numbers, a 20 ms timeline whose jumps are
  marked, and no hole in time at the hand-overs.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import time
from typing import NamedTuple

import numpy as np
import pytest

from tests.helpers import BATON, DEMO, ROOT, EngineProcess, free_port

SIPP = shutil.which("sipp")
TSHARK = shutil.which("tshark")
E2E = os.path.join(ROOT, "tests", "sipp", "e2e")
# The shipped RFC 4733 capture of key 1 (telephone-event on payload type 101).
DTMF_1 = "/usr/share/sip-tester/dtmf_2833_1.pcap"

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(SIPP is None, reason="sipp is not installed"),
    pytest.mark.skipif(not os.path.exists(DTMF_1), reason="SIPp's DTMF pcaps are not installed"),
]


# -- the engine -------------------------------------------------------------------
def finish_engine(engine: EngineProcess) -> None:
    """The engine survived the peers: it answers OPTIONS, stops cleanly on
    SIGTERM and logged no traceback."""
    answered = any(engine._options_answered() for _ in range(5))
    code = engine.stop()
    out = engine.output()
    assert answered, f"engine stopped answering OPTIONS:\n{out}"
    assert code == 0, f"engine exited with {code} on SIGTERM:\n{out}"
    assert "Traceback" not in out, out


def sessions(engine: EngineProcess) -> list[dict]:
    """`baton sessions list` as the operator sees it (newest first)."""
    p = subprocess.run([BATON, "sessions", "list", "--data-dir", engine.data_dir,
                        "--format", "json", "--limit", "500"],
                       capture_output=True, text=True, timeout=20)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def history(engine: EngineProcess, session_id: str) -> dict:
    p = subprocess.run([BATON, "sessions", "history", session_id, "--data-dir",
                        engine.data_dir, "--format", "json"],
                       capture_output=True, text=True, timeout=20)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def settled_sessions(engine: EngineProcess, count: int, timeout: float = 5.0) -> list[dict]:
    """The journal once `count` sessions are in it and all have ended: the
    writer commits in batches, a moment after the calls end."""
    deadline = time.monotonic() + timeout
    while True:
        rows = sessions(engine)
        if (len(rows) >= count and not any(r["live"] for r in rows)) \
                or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def steps(row: dict) -> list[tuple[str, str]]:
    return [(h["module"], h["reason"]) for h in row["history"]]


def demo_with_desk(tmp_path, to: str) -> str:
    """A copy of the demo config whose `desk` node dials `to` instead of the
    engine's own echo; everything else as shipped."""
    with open(DEMO) as f:
        text = f.read()
    head, sep, rest = text.partition("[apps.support.nodes.desk]")
    assert sep, "the demo config has no desk node"
    body, nxt, tail = rest.partition("\n[")
    body, n = re.subn(r'to = "[^"]*"', f'to = "{to}"', body, count=1)
    assert n == 1, f"no `to` in the desk node:\n{rest}"
    path = tmp_path / "demo-desk.toml"
    path.write_text(head + sep + body + nxt + tail)
    return str(path)


# -- SIPp -------------------------------------------------------------------------
def _read(path) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return "(none)"


def _final_stats(path) -> dict:
    """The last row of SIPp's `-trace_stat` CSV (';'-separated)."""
    try:
        with open(path, newline="", errors="replace") as f:
            rows = list(csv.reader(f, delimiter=";"))
    except OSError:
        return {}
    return dict(zip(rows[0], rows[-1])) if len(rows) >= 2 else {}


class Sipp:
    """One SIPp run in its own working directory, with its logs at hand for
    failure reports."""

    def __init__(self, tmp_path, name: str, target: str | None, *args,
                 scenario: str | None = None, calls: int = 1, port: int | None = None,
                 media_port: int | None = None):
        self.work = tmp_path / f"sipp-{name}"
        self.work.mkdir()
        self.port = port or free_port()
        self.media_port = media_port or free_port(even=True)
        self.calls = calls
        w = self.work
        self.err, self.stat, self.screen, self.msgs = (w / "errors.log", w / "stat.csv",
                                                       w / "screen.log", w / "messages.log")
        self.cmd = [SIPP, *([target] if target else []),
                    *(("-sf", os.path.join(E2E, scenario)) if scenario else ()),
                    "-i", "127.0.0.1", "-p", str(self.port),
                    "-mi", "127.0.0.1", "-mp", str(self.media_port),
                    "-t", "u1", "-m", str(calls),
                    "-timeout", "30s", "-timeout_error",
                    # SIPp refuses to start when its socket budget exceeds the fd limit.
                    "-max_socket", "200",
                    "-trace_err", "-error_file", str(self.err),
                    "-trace_stat", "-stf", str(self.stat), "-fd", "1",
                    "-trace_screen", "-screen_file", str(self.screen),
                    "-trace_msg", "-message_file", str(self.msgs),
                    "-nostdin", *args]
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Sipp":
        self.proc = subprocess.Popen(self.cmd, cwd=self.work, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return self

    def wait(self, timeout: float = 60.0) -> int:
        try:
            self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"sipp hung:\n{self.report()}")
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()

    def stats(self) -> dict:
        return _final_stats(self.stat)

    def report(self) -> str:
        code = self.proc.returncode if self.proc is not None else None
        return (f"{' '.join(self.cmd)}\nexit {code}\nerrors:\n{_read(self.err)[-6000:]}\n"
                f"screen:\n{_read(self.screen)[-3000:]}\n"
                f"messages (tail):\n{_read(self.msgs)[-6000:]}")

    def check(self, engine: EngineProcess) -> None:
        """Every call of this run succeeded."""
        stats = self.stats()
        report = f"{self.report()}\nengine:\n{engine.output()[-4000:]}"
        assert self.proc.returncode == 0, report
        assert stats.get("FailedCall(C)") == "0", report
        assert stats.get("SuccessfulCall(C)") == str(self.calls), report


def run_sipp(engine: EngineProcess, tmp_path, name: str, *args, timeout: float = 60.0,
             **kw) -> Sipp:
    s = Sipp(tmp_path, name, f"127.0.0.1:{engine.port}", *args, **kw).start()
    s.wait(timeout)
    s.check(engine)
    return s


def tone_frames(seconds: float, freq: float = 440.0) -> list[bytes]:
    """PCMU payloads of a steady tone, 20 ms each."""
    from ext.g711_py import ulaw_encode

    n = int(seconds * 50)
    t = np.arange(n * 160) / 8000.0
    payload = ulaw_encode((np.sin(2 * np.pi * freq * t) * 8000).astype(np.int16))
    return [payload[i * 160:(i + 1) * 160] for i in range(n)]


def write_pcmu_pcap(path, frames: list[bytes], port: int = 6000) -> None:
    """A pcap of PCMU RTP, one frame per 20 ms, for SIPp's play_pcap_audio,
    which replays payloads and RTP headers at the capture's pace and rewrites
    only addresses and ports."""
    ssrc, seq0, ts0 = 0x5EED1234, 1000, 160000
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]  # Ethernet frames
    for i, payload in enumerate(frames):
        rtp = struct.pack("!BBHII", 0x80, 0x80 if i == 0 else 0, (seq0 + i) & 0xFFFF,
                          ts0 + 160 * i, ssrc) + payload
        udp = struct.pack("!HHHH", port, port, 8 + len(rtp), 0) + rtp
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), i & 0xFFFF, 0, 64, 17, 0,
                         bytes([127, 0, 0, 1]), bytes([127, 0, 0, 1])) + udp
        frame = b"\x00" * 12 + b"\x08\x00" + ip
        usec = i * 20000
        out.append(struct.pack("<IIII", usec // 1_000_000, usec % 1_000_000, len(frame),
                               len(frame)) + frame)
    with open(path, "wb") as f:
        f.write(b"".join(out))


# -- capturing the RTP a peer receives ---------------------------------------------
class Rtp(NamedTuple):
    ssrc: int
    seq: int
    ts: int
    marker: bool
    at: float          # arrival, seconds since the epoch
    pt: int
    payload: bytes


class RtpCapture:
    """tshark on the loopback interface, keeping the UDP sent to one port.

    Started before the call and stopped after it; `-a duration:` bounds it
    even if the test dies on the way."""

    def __init__(self, path, port: int, max_seconds: int = 60):
        self.path = str(path)
        self.port = port
        self.log = open(f"{self.path}.log", "w+")
        self.proc = subprocess.Popen(
            [TSHARK, "-i", "lo", "-f", f"udp and dst port {port}", "-w", self.path,
             "-a", f"duration:{max_seconds}", "-q"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 15
        # tshark says "Capturing on 'Loopback: lo'" once the filter is in place.
        while "Capturing on" not in self._log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"tshark did not start capturing:\n{self._log()}")
            time.sleep(0.05)

    def _log(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            # Let in-flight packets reach the file before the capture ends.
            time.sleep(0.3)
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def packets(self) -> list["Rtp"]:
        """Every RTP packet captured, in arrival order."""
        p = subprocess.run(
            [TSHARK, "-r", self.path, "-d", f"udp.port=={self.port},rtp", "-T", "fields",
             "-e", "rtp.ssrc", "-e", "rtp.seq", "-e", "rtp.timestamp", "-e", "rtp.marker",
             "-e", "frame.time_epoch", "-e", "rtp.p_type", "-e", "rtp.payload"],
            capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        out = []
        for line in p.stdout.splitlines():
            f = line.split("\t")
            if len(f) < 6 or not f[0]:
                continue
            out.append(Rtp(ssrc=int(f[0], 16), seq=int(f[1]), ts=int(f[2]),
                           marker=f[3] in ("1", "True"), at=float(f[4]), pt=int(f[5]),
                           payload=bytes.fromhex(f[6].replace(":", "")) if len(f) > 6 else b""))
        return out


# -- the tests --------------------------------------------------------------------
def test_menu_key_1_bridges_to_the_echo(tmp_path):
    """2000: the prompt, key 1 as RFC 4733, bridged into the engine's own
    echo; the caller hangs up."""
    if TSHARK is not None:
        # The scenario announces telephone-event on the payload type the
        # pcap carries (SIPp replays RTP headers unchanged).
        with open(os.path.join(E2E, "uac_dtmf.xml")) as f:
            announced = re.search(r"a=rtpmap:(\d+) telephone-event", f.read()).group(1)
        p = subprocess.run([TSHARK, "-r", DTMF_1, "-d", "udp.port==0-65535,rtp", "-T",
                            "fields", "-e", "rtp.p_type"], capture_output=True, text=True,
                           timeout=30)
        assert set(p.stdout.split()) == {announced}, p.stdout
    with EngineProcess() as engine:
        run_sipp(engine, tmp_path, "dtmf", "-s", "2000", scenario="uac_dtmf.xml")
        rows = settled_sessions(engine, 2)
        assert len(rows) == 2, rows
        assert not any(r["live"] for r in rows), rows
        caller = [r for r in rows if r["number"] == "2000"]
        echo = [r for r in rows if r["number"] == "1001"]
        assert len(caller) == 1 and len(echo) == 1, rows
        h = history(engine, caller[0]["id"])
        assert steps(h) == [("baton.menu", "initial"), ("baton.bridge", "outlet:1")], h
        assert [x["node"] for x in h["history"]] == ["menu", "desk"], h
        assert h["end_reason"] == "hangup", h
        # The leg the bridge placed: a session of its own, in the echo module.
        e = history(engine, echo[0]["id"])
        assert steps(e) == [("baton.echo", "initial")], e
        assert e["end_reason"] is not None and not e["live"], e
        finish_engine(engine)


def _survey_flow(tmp_path, capture: bool):
    """2000 with the desk on a SIPp UAS that hangs up after 2 s: the caller
    presses 1, hears the ringback and the UAS, then the survey, then gets
    the engine's BYE. Returns the engine (stopped), the journal's rows, and
    with `capture` the RTP the caller received and the payloads the UAS sent."""
    uas_port = free_port()
    config = demo_with_desk(tmp_path, f"sip:desk@127.0.0.1:{uas_port}")
    uas = Sipp(tmp_path, "uas", None, scenario="uas_hangup.xml", port=uas_port)
    # The UAS streams this while answered; SIPp resolves it in its working dir.
    tone = tone_frames(4.0)
    write_pcmu_pcap(uas.work / "uas_tone.pcap", tone)
    caller_media = free_port(even=True)
    cap = None
    with EngineProcess(config=config) as engine:
        uas.start()
        try:
            if capture:
                cap = RtpCapture(tmp_path / "caller-rtp.pcap", caller_media)
            try:
                run_sipp(engine, tmp_path, "caller", "-s", "2000",
                         scenario="uac_dtmf_survey.xml", media_port=caller_media)
            finally:
                if cap is not None:
                    cap.stop()
            code = uas.wait(30)
            stats = uas.stats()
            report = f"UAS:\n{uas.report()}\nengine:\n{engine.output()[-4000:]}"
            assert code == 0 and stats.get("SuccessfulCall(C)") == "1", report
        finally:
            uas.kill()
        rows = settled_sessions(engine, 1)
        finish_engine(engine)
    return engine, rows, (cap, set(tone))


def test_dialled_party_hangs_up_then_survey_then_engine_hangs_up(tmp_path):
    engine, rows, _ = _survey_flow(tmp_path, capture=False)
    # Only the caller's session: the UAS is outside the engine.
    assert len(rows) == 1, rows
    h = history(engine, rows[0]["id"])
    assert steps(h) == [("baton.menu", "initial"), ("baton.bridge", "outlet:1"),
                        ("baton.play", "event:dialled-hangup")], h
    assert [x["node"] for x in h["history"]] == ["menu", "desk", "survey"], h
    # Each span closed with the reason control moved on; the survey's with the end.
    assert [x["end_reason"] for x in h["history"]][:2] == ["outlet:1", "event:dialled-hangup"], h
    assert h["history"][-1]["end_reason"] is not None, h
    # The survey's `done` outlet is not wired: the engine ends the call.
    assert h["end_reason"] == "outlet:done" and not h["live"], h
    # The survey played out: the engine ended the call well after the hand-over.
    survey = h["history"][-1]
    assert (survey["end_mono_ns"] - survey["start_mono_ns"]) / 1e9 > 1.0, h


def test_bridge_1002_under_load(tmp_path):
    """1002 bridges to 1001 on the same engine: 20 calls of 2 s at 5/s."""
    with EngineProcess() as engine:
        run_sipp(engine, tmp_path, "uac", "-sn", "uac", "-s", "1002", "-d", "2000",
                 "-r", "5", calls=20)
        rows = settled_sessions(engine, 40)
        assert len(rows) == 40, [(r["number"], r["live"]) for r in rows]
        by_number = {}
        for r in rows:
            by_number.setdefault(r["number"], []).append(r)
        assert sorted(by_number) == ["1001", "1002"], by_number.keys()
        assert len(by_number["1002"]) == 20 and len(by_number["1001"]) == 20
        assert all(r["module"] == "baton.bridge" for r in by_number["1002"]), by_number["1002"]
        assert all(r["module"] == "baton.echo" for r in by_number["1001"]), by_number["1001"]
        live = [r["id"] for r in rows if r["live"] or r["end_reason"] is None]
        assert not live, live
        finish_engine(engine)


@pytest.mark.skipif(TSHARK is None, reason="tshark is not installed")
def test_caller_rtp_is_one_stream_across_modules(tmp_path):
    """What the caller's endpoint receives through menu -> bridge -> play:
    the media clock (prompt, silence, ringback), then the UAS's packets
    relayed, then the media clock again (survey), all as one RTP stream."""
    engine, rows, (cap, uas_frames) = _survey_flow(tmp_path, capture=True)
    h = history(engine, rows[0]["id"])
    assert [x["module"] for x in h["history"]] == ["baton.menu", "baton.bridge",
                                                    "baton.play"], h
    pkts = cap.packets()
    assert len(pkts) > 200, f"{len(pkts)} RTP packets captured"
    report = analyse_rtp(pkts, uas_frames)
    where = json.dumps(report, indent=1)
    assert report["ssrcs"] == 1, where
    assert report["payload_types"] == [0], where
    assert report["seq_faults"] == [], where
    assert report["ts_faults"] == [], where
    # Who fed the stream, in order: the engine, the relayed UAS (~2 s of it),
    # the engine again; each change starts with a marked packet.
    assert [src for src, _, _ in report["sources"]] == ["engine", "relay", "engine"], where
    assert 80 <= report["sources"][1][1] <= 120, where
    assert all(marked for _, _, marked in report["sources"]), where
    # The engine sends every 20 ms whatever feeds the stream: no hole in time
    # at the hand-overs (60 ms leaves room for scheduling jitter on a busy host).
    assert report["max_gap_ms"] <= 60.0, where
    print(f"\ncaller RTP: {report['packets']} packets, max gap {report['max_gap_ms']} ms, "
          f"gaps at the source changes {report['gaps_at_changes_ms']} ms")


def analyse_rtp(pkts: list[Rtp], relayed: set[bytes]) -> dict:
    """Continuity of one received RTP stream, in arrival order. A packet
    whose payload is one of `relayed` came through the relay, any other from
    the engine's media clock."""
    seq_faults, ts_faults, gaps_at_changes = [], [], []
    max_gap = 0.0
    sources: list[list] = []     # [source, packets, first packet marked]
    for i, p in enumerate(pkts):
        src = "relay" if p.payload in relayed else "engine"
        if not sources or sources[-1][0] != src:
            sources.append([src, 0, p.marker])
            if i:
                gaps_at_changes.append(round((p.at - pkts[i - 1].at) * 1000.0, 1))
        sources[-1][1] += 1
        if not i:
            continue
        prev = pkts[i - 1]
        if (p.seq - prev.seq) & 0xFFFF != 1:
            seq_faults.append((i, prev.seq, p.seq))
        dt = (p.ts - prev.ts) & 0xFFFFFFFF
        # Within a source every packet is 20 ms later; a new source may jump
        # ahead by the time that passed, and must say so with the marker.
        if dt != 160 and not (p.marker and 160 <= dt < 0x80000000):
            ts_faults.append((i, prev.ts, p.ts, p.marker))
        max_gap = max(max_gap, (p.at - prev.at) * 1000.0)
    return {"packets": len(pkts), "ssrcs": len({p.ssrc for p in pkts}),
            "payload_types": sorted({p.pt for p in pkts}),
            "seq_faults": seq_faults[:20], "ts_faults": ts_faults[:20],
            "markers": sum(p.marker for p in pkts), "sources": sources,
            "max_gap_ms": round(max_gap, 1), "gaps_at_changes_ms": gaps_at_changes}
