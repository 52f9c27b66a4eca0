"""`baton load` against real targets on loopback: Baton's own demo (echo 1001) over
UDP and TCP, a UAS that answers 503 to every other call, Ctrl-C mid-run, bad input."""
from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request

import pytest

from engine.load import emodel
from tests.helpers import BATON, DEMO, EngineProcess, free_port


def rtp_range() -> str:
    lo = free_port(even=True)
    return f"{lo}-{min(lo + 400, 65534)}"


def load(args: list, report, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    cmd = [BATON, "load", *args, "--report", str(report), "--rtp-ports", rtp_range()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def demo():
    metrics_port = free_port(socket.SOCK_STREAM)
    engine = EngineProcess(DEMO, extra=["--metrics-addr", f"127.0.0.1:{metrics_port}"])
    engine.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        yield engine.wait_ready()
    finally:
        engine.stop()


def scrape(url: str) -> dict:
    """Prometheus text as {"name{labels}": value}."""
    out = {}
    with urllib.request.urlopen(url, timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
    return out


class MediaClockWatch:
    """Watches a Baton process's media clock on its /metrics (every 0.1 s, in a thread):
    the wall-clock spans in which it skipped a tick (`baton_media_late_ticks_total`) or a
    channel slipped a frame (`baton_media_slips_total`: a packet that came after the tick
    that should have played it)."""

    COUNTERS = ("baton_media_late_ticks_total", "baton_media_slips_total")

    def __init__(self, url: str):
        self.url = url
        self.samples: list[tuple[float, tuple]] = []
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            try:
                m = scrape(self.url)
                self.samples.append((time.time(), tuple(m[k] for k in self.COUNTERS)))
            except OSError:
                pass
            time.sleep(0.1)

    def stop(self) -> list[tuple[float, float]]:
        """The spans (from, to) in which either count rose."""
        self.running = False
        self.thread.join()
        return [(a[0], b[0]) for a, b in zip(self.samples, self.samples[1:]) if b[1] != a[1]]


def media_window(row: dict, started_unix: float) -> tuple[float, float]:
    """Wall-clock span of a call's media: from its answer to its end."""
    answered = started_unix + float(row["started"]) + float(row["t200"]) / 1000.0
    return answered, answered + float(row["duration_s"])


def summary_of(report) -> dict:
    return json.loads((report / "summary.json").read_text())


# What these measure is the compiled media path's timing; the Python twins' results are
# checked against the kernels in their own differential tests.
COMPILED_MEDIA = pytest.mark.skipif(os.environ.get("BATON_NO_EXTENSIONS") == "1",
                                    reason="media quality is measured on the compiled kernels")


def undisturbed(rows: list, s: dict, target_spans: list) -> list:
    """The calls whose media neither side's clock disturbed.

    A media tick skipped on either side (a busy machine), or a packet that came after the
    tick that should have played it (a frame heard as silence and the rest 20 ms later: a
    slip), puts a hole into what was sent, echoed or recorded. The generator counts its
    own per call (late_ticks, slips); the far engine's were watched on its /metrics
    (MediaClockWatch), and a call whose media span overlaps a rise there is set aside."""
    clean = []
    for row in rows:
        lo, hi = media_window(row, s["started_unix"])
        if row["late_ticks"] == "0" and row["slips"] == "0" and not any(
                a < hi + 0.1 and b > lo - 0.1 for a, b in target_spans):
            clean.append(row)
    return clean


def run_watched(demo, tmp_path, args: list) -> tuple:
    """`baton load` against the demo with its media clock watched: (result, spans)."""
    watch = MediaClockWatch(demo.metrics_url)
    try:
        r = load([f"127.0.0.1:{demo.port}", "--number", "1001", *args], tmp_path)
    finally:
        spans = watch.stop()
    assert r.returncode == 0, r.stderr
    return r, spans


# Every undisturbed call must pass, in every run; on a busy machine most calls may be
# disturbed, so up to RUNS runs gather at least NEED undisturbed calls to judge.
RUNS, NEED = 3, 5


@COMPILED_MEDIA
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_echo_check_against_the_demo(demo, tmp_path, transport):
    judged = []
    for attempt in range(RUNS):
        report = tmp_path / f"run{attempt}"
        r, spans = run_watched(demo, report, ["--rate", "10", "--calls", "20", "--hold", "1",
                                              "--scenario", "echo-check",
                                              "--transport", transport, "--json"])
        s = json.loads(r.stdout)
        assert s == summary_of(report)
        assert s["calls"]["codes"] == {"200": 20} and s["calls"]["asr_pct"] == 100.0
        assert s["echo"]["checked"] == 20
        assert s["audio"] == {"two-way": 20}
        assert s["rtp"]["received"] > 20 * 40
        assert s["quality"]["mos"]["p50"] > 4.3          # clean loopback, G.711: R ~ 92
        assert s["pdd_ms"]["t200"]["p50"] is not None
        assert (report / "load.png").stat().st_size > 10_000
        assert "rate" in r.stderr and "MOS" in r.stderr       # the live view
        rows = list(csv.DictReader(open(report / "calls.csv")))
        assert len(rows) == 20 and {row["code"] for row in rows} == {"200"}
        assert s["calls_with_late_ticks"] == sum(1 for row in rows if row["late_ticks"] != "0")
        assert s["calls_with_slips"] == sum(1 for row in rows if row["slips"] != "0")
        clean = undisturbed(rows, s, spans)
        # The probe comes back intact on every call neither clock disturbed.
        brief = [{k: row[k] for k in ("index", "echo_correlation", "rtp_lost", "slips",
                                      "late_ticks", "outcome")} for row in rows]
        why = f"far engine's spans {spans}, started {s['started_unix']}: {brief}"
        assert all(float(row["echo_correlation"]) > 0.9 for row in clean), why
        assert all(row["outcome"] == "check:pass hold:done" for row in clean), why
        assert all(row["rtp_lost"] == "0" for row in clean), why
        if len(clean) == len(rows):
            assert s["echo"] == {"checked": 20, "passed": 20} and s["rtp"]["loss_pct"] == 0.0
        judged += clean
        if len(judged) >= NEED:
            break
    assert len(judged) >= NEED, f"only {len(judged)} undisturbed calls in {RUNS} runs"


def test_prometheus_metrics_while_it_runs(demo, tmp_path):
    """`--metrics-addr`: /metrics is scraped during the run and agrees with itself and with
    the final report."""
    proc = subprocess.Popen([BATON, "load", f"127.0.0.1:{demo.port}", "--number", "1001",
                             "--rate", "10", "--calls", "20", "--hold", "2", "--quiet",
                             "--metrics-addr", "127.0.0.1:0", "--report", str(tmp_path),
                             "--rtp-ports", rtp_range()],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "metrics at http://127.0.0.1:" in line, line + proc.stderr.read()
        url = line.split()[-1]
        m = scrape(url)
        while m.get('baton_load_calls_ended_total{code="200"}', 0) < 5:
            time.sleep(0.2)
            m = scrape(url)
        during = m
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    s = summary_of(tmp_path)
    assert during["baton_load_offered_rate"] == 10.0
    assert during["baton_load_achieved_rate"] > 0
    assert 5 <= during["baton_load_calls_started_total"] <= 20
    # Calls are 2 s long at 10 a second: some are up while others have ended.
    assert during["baton_load_calls_up"] >= 1
    answered = during["baton_load_calls_answered_total"]
    assert answered == during['baton_load_calls_ended_total{code="200"}'] >= 5
    assert during["baton_load_pdd_seconds_count"] == answered
    assert during['baton_load_pdd_seconds_bucket{le="+Inf"}'] == answered
    assert during["baton_load_pdd_seconds_sum"] > 0
    # Every answered call of the echo received RTP and was rated.
    assert during["baton_load_mos_count"] == answered
    assert during['baton_load_mos_bucket{le="4"}'] <= answered
    assert during['baton_load_rtp_packets_total{direction="in"}'] > answered * 50
    assert during["baton_load_rtp_expected_packets_total"] > 0
    assert "baton_load_rtp_lost_packets_total" in during
    assert "baton_load_media_late_ticks_total" in during
    assert s["calls"]["codes"] == {"200": 20}
    assert during["baton_load_calls_started_total"] <= s["calls"]["started"]


def test_metrics_addr_that_cannot_be_served(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = load(["127.0.0.1:5", "--metrics-addr", f"127.0.0.1:{taken.getsockname()[1]}",
                  "--calls", "1"], tmp_path)
    assert r.returncode == 2 and "--metrics-addr" in r.stderr, r.stderr
    r = load(["127.0.0.1:5", "--metrics-addr", "nohost:port", "--calls", "1"], tmp_path)
    assert r.returncode == 2 and "--metrics-addr" in r.stderr, r.stderr


@COMPILED_MEDIA
def test_dtmf_roundtrip_is_all_detected(demo, tmp_path):
    judged = []
    for attempt in range(RUNS):
        report = tmp_path / f"run{attempt}"
        _r, spans = run_watched(demo, report, ["--rate", "10", "--calls", "10", "--hold", "1",
                                               "--scenario", "dtmf-roundtrip", "--quiet"])
        s = summary_of(report)
        assert s["dtmf"]["sent"] == 120
        # Every key of every call neither media clock disturbed is detected; a disturbed
        # call is reported, not judged.
        rows = list(csv.DictReader(open(report / "calls.csv")))
        clean = undisturbed(rows, s, spans)
        assert all(row["dtmf_detected"] == "1234567890*#" for row in clean), rows
        assert all(row["outcome"] == "send:done expect:matched hold:done" for row in clean)
        if len(clean) == len(rows):
            assert s["dtmf"] == {"sent": 120, "detected": 120, "detected_pct": 100.0}
        judged += clean
        if len(judged) >= NEED:
            break
    assert len(judged) >= NEED, f"only {len(judged)} undisturbed calls in {RUNS} runs"


def test_ctrl_c_stops_cleanly_with_a_report(demo, tmp_path):
    proc = subprocess.Popen([BATON, "load", f"127.0.0.1:{demo.port}", "--number", "1001",
                             "--rate", "20", "--calls", "100000", "--hold", "60",
                             "--report", str(tmp_path), "--rtp-ports", rtp_range()],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if line.startswith("[") and int(line.split(" up ")[1].split()[0]) >= 10:
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    s = summary_of(tmp_path)
    assert s["calls"]["interrupted"] is True
    assert s["calls"]["started"] == s["calls"]["completed"] >= 10
    assert s["calls"]["codes"].get("200", 0) >= 10


class HalfBusyUas:
    """A UDP UAS: every other INVITE gets 503, the rest 200 with an SDP answer;
    BYE and OPTIONS get 200."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.media = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.media.bind(("127.0.0.1", 0))
        self.invites = 0
        self.running = True
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        seen = {}
        while self.running:
            try:
                data, addr = self.sock.recvfrom(65535)
            except OSError:
                continue
            head = data.split(b"\r\n\r\n", 1)[0].decode()
            lines = head.split("\r\n")
            method = lines[0].split()[0]
            if method == "ACK":
                continue
            keep = [ln for ln in lines[1:] if ln.split(":", 1)[0].lower() in
                    ("via", "from", "to", "call-id", "cseq")]
            body = b""
            status = "200 OK"
            if method == "INVITE":
                call_id = next(ln for ln in keep if ln.lower().startswith("call-id"))
                if call_id not in seen:
                    self.invites += 1
                    seen[call_id] = self.invites % 2 == 0
                if seen[call_id]:
                    status = "503 Service Unavailable"
                else:
                    body = (f"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\n"
                            f"t=0 0\r\nm=audio {self.media.getsockname()[1]} RTP/AVP 0\r\n"
                            f"a=rtpmap:0 PCMU/8000\r\n").encode()
                keep = [ln + ";tag=uas1" if ln.lower().startswith("to:") and "tag=" not in ln
                        else ln for ln in keep]
                keep.append(f"Contact: <sip:uas@127.0.0.1:{self.port}>")
            msg = "\r\n".join([f"SIP/2.0 {status}", *keep,
                               *(["Content-Type: application/sdp"] if body else []),
                               f"Content-Length: {len(body)}", "", ""]).encode() + body
            self.sock.sendto(msg, addr)

    def close(self) -> None:
        self.running = False
        self.thread.join()
        self.sock.close()
        self.media.close()


def test_a_target_answering_503_to_half_the_calls(tmp_path):
    uas = HalfBusyUas()
    try:
        r = load([f"127.0.0.1:{uas.port}", "--number", "500", "--rate", "20", "--calls", "20",
                  "--hold", "0.5", "--quiet"], tmp_path)
    finally:
        uas.close()
    assert r.returncode == 0, r.stderr
    s = summary_of(tmp_path)
    assert s["calls"]["codes"] == {"200": 10, "503": 10}
    assert s["calls"]["asr_pct"] == 50.0
    # The UAS sends no RTP back: one-way audio, and nothing to rate.
    assert s["audio"] == {"one-way": 10}
    assert s["quality"]["mos"]["mean"] is None


def test_bad_input_gets_clear_errors(tmp_path):
    port = free_port()
    r = load([f"127.0.0.1:{port}", "--calls", "3"], tmp_path, timeout=30)
    assert r.returncode == 3 and "no answer to OPTIONS" in r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('start = "a"\n[nodes.a]\nmodule = "load.play"\noutlets = { done = "b" }\n')
    r = load([f"127.0.0.1:{port}", "--scenario", str(bad)], tmp_path)
    assert r.returncode == 2 and "nodes.a.outlets.done" in r.stderr
    r = load([f"127.0.0.1:{port}", "--rate", "0"], tmp_path)
    assert r.returncode == 2 and "--rate" in r.stderr
    r = load(["sips:1@127.0.0.1", "--calls", "1"], tmp_path)
    assert r.returncode == 2 and "bad target" in r.stderr
    assert not (tmp_path / "summary.json").exists()


def test_mos_falls_as_the_e_model_says():
    clean = emodel.r_factor(0.0, emodel.mouth_to_ear(0, 0))
    assert clean == pytest.approx(93.2 - 0.024 * 20)
    assert emodel.r_factor(1.0, 20) > emodel.r_factor(5.0, 20) > emodel.r_factor(10.0, 20)
    assert emodel.r_factor(0.0, 300) == pytest.approx(93.2 - 0.024 * 300 - 0.11 * (300 - 177.3))
    assert emodel.mos(93.2) == pytest.approx(4.41, abs=0.01)
    assert emodel.mos(50) == pytest.approx(2.58, abs=0.01)
