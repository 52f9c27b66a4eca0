"""`baton load` against real targets on loopback, a few calls each: Kamailio as a stateless
responder (signalling only: a 200 without SDP) and as a stateful proxy in front of Baton, a
PJSIP endpoint answering, baresip answering (its own tone, and its echo module), a
Twilio-style IVR walked with `ivr-walk`, and a digest-challenging
trunk (SIPp) named as `trunk:NAME` from a config with its credentials."""
from __future__ import annotations

import asyncio
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from tests.baresip_ua import Baresip, needs_baresip
from tests.helpers import BATON, DEMO, ROOT, EngineProcess, free_port, options

KAMAILIO = shutil.which("kamailio") or ("/usr/sbin/kamailio"
                                        if os.path.exists("/usr/sbin/kamailio") else None)
SIPP = shutil.which("sipp")
needs_kamailio = pytest.mark.skipif(KAMAILIO is None, reason="kamailio is not installed")
COMPILED_MEDIA = pytest.mark.skipif(os.environ.get("BATON_NO_EXTENSIONS") == "1",
                                    reason="media quality is measured on the compiled kernels")


def rtp_range() -> str:
    lo = free_port(even=True)
    return f"{lo}-{min(lo + 200, 65534)}"


def load_cmd(args: list, report) -> list:
    return [BATON, "load", *args, "--report", str(report), "--rtp-ports", rtp_range(), "--quiet"]


def load(args: list, report, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(load_cmd(args, report), capture_output=True, text=True,
                          timeout=timeout)


def rows_of(report) -> list[dict]:
    with open(report / "calls.csv") as f:
        return list(csv.DictReader(f))


def summary_of(report) -> dict:
    return json.loads((report / "summary.json").read_text())


class Kamailio:
    """Kamailio in the foreground (-DD -E) from a config template on a free UDP port."""

    def __init__(self, template: str, **subst):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="baton-kam-")
        text = open(template).read().replace("@PORT@", str(self.port))
        for key, value in subst.items():
            text = text.replace(f"@{key.upper()}@", value)
        cfg = os.path.join(self.dir, "kamailio.cfg")
        with open(cfg, "w") as f:
            f.write(text)
        self.log = open(os.path.join(self.dir, "kamailio.log"), "w")
        self.proc = subprocess.Popen([KAMAILIO, "-f", cfg, "-P", os.path.join(self.dir, "k.pid"),
                                      "-w", self.dir, "-DD", "-E"], stdout=self.log,
                                     stderr=subprocess.STDOUT, cwd=self.dir)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 15.0) -> None:
        import socket

        deadline = time.monotonic() + timeout
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            s.settimeout(0.3)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                s.sendto(options("127.0.0.1", self.port, s.getsockname()[1]),
                         ("127.0.0.1", self.port))
                try:
                    if s.recv(65535).startswith(b"SIP/2.0 200"):
                        return
                except OSError:
                    continue
        self.stop()
        raise RuntimeError(f"kamailio did not start:\n{self.output()}")

    def output(self) -> str:
        return open(os.path.join(self.dir, "kamailio.log"), errors="replace").read()[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- Kamailio ---------------------------------------------------------------------------

@needs_kamailio
def test_kamailio_stateless_responder_is_signalling_only(tmp_path):
    """Its 200 carries no SDP: every call is answered and held, the report says `audio:
    none` (nothing to rate) rather than failing, and a scenario step that needs media ends
    the call with the outcome `no-media`."""
    kam = Kamailio(os.path.join(ROOT, "bench", "baseline", "kamailio-responder.cfg"))
    try:
        r = load([f"127.0.0.1:{kam.port}", "--number", "1000", "--rate", "20", "--calls", "10",
                  "--hold", "0.5"], tmp_path / "hold")
        assert r.returncode == 0, r.stderr
        s = summary_of(tmp_path / "hold")
        assert s["calls"]["codes"] == {"200": 10} and s["calls"]["asr_pct"] == 100.0
        assert s["calls"]["answered_without_sdp"] == 10
        assert s["audio"] == {"none": 10}
        assert s["rtp"]["sent"] == 0 and s["rtp"]["loss_pct"] is None
        assert s["quality"]["mos"]["mean"] is None
        assert s["outcomes"] == {"hold:done": 10}
        rows = rows_of(tmp_path / "hold")
        assert all(row["error"] == "" and row["ended_by"] == "local" for row in rows)
        assert all(float(row["duration_s"]) > 0.4 for row in rows)

        r = load([f"127.0.0.1:{kam.port}", "--number", "1001", "--rate", "20", "--calls", "4",
                  "--scenario", "echo-check"], tmp_path / "echo")
        assert r.returncode == 0, r.stderr
        s = summary_of(tmp_path / "echo")
        assert s["outcomes"] == {"check:no-media": 4}
        assert s["echo"] == {"checked": 0, "passed": 0}
    finally:
        kam.stop()


@needs_kamailio
@COMPILED_MEDIA
def test_kamailio_stateful_proxy_in_front_of_baton(tmp_path):
    """Signalling through the proxy (record-routed: the BYE goes through it too), media
    straight to the engine's echo."""
    engine = EngineProcess(DEMO).wait_ready()
    kam = None
    try:
        kam = Kamailio(os.path.join(ROOT, "tests", "kamailio", "proxy.cfg"),
                       next=f"127.0.0.1:{engine.port}")
        r = load([f"127.0.0.1:{kam.port}", "--number", "1001", "--rate", "10", "--calls", "6",
                  "--hold", "1", "--scenario", "echo-check"], tmp_path)
        assert r.returncode == 0, r.stderr + kam.output()
        s = summary_of(tmp_path)
        assert s["calls"]["codes"] == {"200": 6}, kam.output()
        assert s["audio"] == {"two-way": 6}
        rows = rows_of(tmp_path)
        # The BYE went through the proxy and was answered: every call ended by us, on time.
        assert all(row["ended_by"] == "local" for row in rows)
        kept_time = [row for row in rows if row["late_ticks"] == "0"]
        assert all(row["outcome"] == "check:pass hold:done" for row in kept_time), rows
        assert s["pdd_ms"]["t100"]["p50"] is not None      # the proxy's 100 Trying
    finally:
        if kam is not None:
            kam.stop()
        engine.stop()


# -- PJSIP ------------------------------------------------------------------------------

@pytest.mark.interop
@COMPILED_MEDIA
def test_pjsip_endpoint_answers_and_keys_digits(tmp_path):
    """A pjsua2 endpoint answers, sends RFC 4733 keys 1, 2, 3 a second in; the scenario
    waits for them and holds. PJSIP's RTP comes back: two-way audio, rated."""
    pytest.importorskip("pjsua2", reason="pjsua2 is not installed")
    peer = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "pjsip_keys.py"),
                             "answer", "--steps", "w1.0,123", "--max", "15", "--ring", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        for line in peer.stdout:
            if line.startswith("READY"):
                break
        assert line.startswith("READY"), line + peer.stderr.read()
        port = int(line.split()[1])
        scenario = tmp_path / "keys.toml"
        scenario.write_text(
            'start = "keys"\n'
            '[nodes.keys]\nmodule = "load.expect_digits"\n'
            'params = { digits = "123", timeout = 8 }\noutlets = { matched = "hold" }\n'
            '[nodes.hold]\nmodule = "load.hold"\nparams = { seconds = 1 }\n')
        r = load([f"127.0.0.1:{port}", "--number", "peer", "--calls", "1", "--no-probe",
                  "--scenario", str(scenario)], tmp_path / "r")
        out, err = peer.communicate(timeout=30)
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.wait()
    assert r.returncode == 0, r.stderr
    s = summary_of(tmp_path / "r")
    assert s["calls"]["codes"] == {"200": 1}, err[-2000:]
    row = rows_of(tmp_path / "r")[0]
    assert row["outcome"] == "keys:matched hold:done", row
    assert "123" in row["dtmf_detected"]
    assert row["audio"] == "two-way" and int(row["rtp_received"]) > 50, row
    assert float(row["mos"]) > 4.0
    result = json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:])
    assert result.get("hung_up_by") == "engine", result      # our BYE reached it


# -- baresip ----------------------------------------------------------------------------

SDP_ADDRESS = re.compile(r"^[co]=IN IP4 (\S+)", re.M)
BYE_OK = re.compile(r"SIP/2\.0 200 OK\r?\n(?:[^\r\n]+\r?\n)*?CSeq: *\d+ BYE")


def baresip_ended_every_call(ua: Baresip, calls: int) -> None:
    """baresip took every call and answered each BYE, and all SDP on the wire
    (its own and the generator's) named 127.0.0.1."""
    trace = ua.output()
    assert len(re.findall(r"Call with \S+ terminated", trace)) == calls, trace[-4000:]
    assert len(BYE_OK.findall(trace)) == calls, trace[-4000:]
    assert set(SDP_ADDRESS.findall(trace)) == {"127.0.0.1"}, trace[-4000:]


@pytest.mark.interop
@needs_baresip
@COMPILED_MEDIA
def test_baresip_auto_answers_with_its_tone(tmp_path):
    """baresip's account answers by itself (`answermode=auto`) and sends its audio source, a
    440 Hz tone from `aufile`: the scenario waits for the tone, then holds. RTP both ways,
    nothing lost on loopback, every call rated."""
    scenario = tmp_path / "tone.toml"
    scenario.write_text(
        'start = "tone"\n'
        '[nodes.tone]\nmodule = "load.wait"\n'
        'params = { for = "tone", timeout = 5 }\noutlets = { heard = "hold" }\n'
        '[nodes.hold]\nmodule = "load.hold"\nparams = { seconds = 1 }\n')
    with Baresip(tmp_path, auto_answer=True) as ua:
        r = load([f"127.0.0.1:{ua.port}", "--number", Baresip.USER, "--rate", "5",
                  "--calls", "3", "--scenario", str(scenario)], tmp_path / "r")
        assert r.returncode == 0, r.stderr + ua.output()[-4000:]
        s = summary_of(tmp_path / "r")
        assert s["calls"]["codes"] == {"200": 3}, ua.output()[-4000:]
        assert s["outcomes"] == {"tone:heard hold:done": 3}
        assert s["audio"] == {"two-way": 3}
        assert s["rtp"]["expected"] > 100 and s["rtp"]["lost"] == 0
        assert s["rtp"]["loss_pct"] == 0.0
        assert s["rtp"]["jitter_ms"]["p50"] is not None
        assert s["quality"]["mos"]["mean"] > 4.0
        for row in rows_of(tmp_path / "r"):
            assert row["ended_by"] == "local" and row["codec"] in ("PCMU", "PCMA"), row
            assert int(row["rtp_received"]) > 40 and row["rtp_lost"] == "0", row
            assert float(row["jitter_ms"]) >= 0 and float(row["mos"]) > 4.0, row
        baresip_ended_every_call(ua, 3)
        assert ua.quit() == 0, ua.output()[-4000:]


@pytest.mark.interop
@needs_baresip
@COMPILED_MEDIA
def test_baresip_echo_module_passes_echo_check(tmp_path):
    """baresip's `echo` module answers and sends back what it hears: echo-check finds the
    probe in what comes back and measures the round trip."""
    with Baresip(tmp_path, echo=True) as ua:
        r = load([f"127.0.0.1:{ua.port}", "--number", Baresip.USER, "--rate", "5",
                  "--calls", "3", "--hold", "2", "--scenario", "echo-check"], tmp_path / "r")
        assert r.returncode == 0, r.stderr + ua.output()[-4000:]
        s = summary_of(tmp_path / "r")
        assert s["calls"]["codes"] == {"200": 3}, ua.output()[-4000:]
        assert s["audio"] == {"two-way": 3}
        assert s["rtp"]["expected"] > 200 and s["rtp"]["lost"] == 0
        assert s["rtp"]["loss_pct"] == 0.0
        assert s["rtp"]["jitter_ms"]["p50"] is not None
        assert s["quality"]["mos"]["mean"] > 4.0
        assert s["echo"]["checked"] == 3
        rows = rows_of(tmp_path / "r")
        assert all(row["ended_by"] == "local" for row in rows), rows
        # A call our own media clock disturbed (late ticks, slips) has a hole we made.
        kept_time = [row for row in rows if row["late_ticks"] == "0" and row["slips"] == "0"]
        assert kept_time, rows
        for row in kept_time:
            assert row["outcome"] == "check:pass hold:done", row
            assert float(row["echo_correlation"]) > 0.9 and float(row["delay_ms"]) > 0, row
        baresip_ended_every_call(ua, 3)
        assert ua.quit() == 0, ua.output()[-4000:]


# -- a TwiML IVR walked with ivr-walk ---------------------------------------------------

SECRET = "ivr-load-secret-0123456789"


def ivr_config(tmp_path, url: str) -> str:
    text = open(DEMO).read()
    text = text.replace('"2000" = { app = "support" }',
                        f'"2000" = {{ app = "support" }}\n"4900" = {{ instructions = "{url}/ivr" }}')
    # The app server runs on this machine: the operator lists it (docs/security.md).
    text = text.replace("fetch_allow = []", 'fetch_allow = ["127.0.0.1/32"]')
    path = tmp_path / "ivr.toml"
    path.write_text(text)
    return str(path)


@COMPILED_MEDIA
async def test_ivr_walk_through_a_twiml_ivr(tmp_path):
    voice = pytest.importorskip("twilio.twiml.voice_response", reason="twilio is not installed")
    from tests.twiml_apps import AppServer

    app = AppServer(secret=SECRET)

    def ivr(params, _request):
        vr = voice.VoiceResponse()
        g = vr.gather(num_digits=1, action=f"{app.url}/pressed", timeout=8)
        g.say("Welcome. Press one.")
        return vr

    def pressed(params, _request):
        vr = voice.VoiceResponse()
        vr.say(f"You pressed {params.get('Digits', 'nothing')}. Goodbye.")
        vr.pause(length=5)
        return vr

    app.route("/ivr", ivr)
    app.route("/pressed", pressed)
    await app.start()
    engine = EngineProcess(ivr_config(tmp_path, app.url))
    try:
        await asyncio.to_thread(engine.wait_ready)
        proc = await asyncio.create_subprocess_exec(
            *load_cmd([f"127.0.0.1:{engine.port}", "--number", "4900", "--rate", "5",
                       "--calls", "3", "--scenario", "ivr-walk"], tmp_path / "r"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        s = summary_of(tmp_path / "r")
        assert s["calls"]["codes"] == {"200": 3}
        rows = rows_of(tmp_path / "r")
        kept_time = [row for row in rows if row["late_ticks"] == "0"]
        assert kept_time, rows
        for row in kept_time:
            assert row["outcome"] == "prompt:heard press:done next:heard hold:done", row
            assert row["prompts_heard"] == "2" and row["dtmf_sent"] == "1"
        # The app server saw the key the generator pressed, once per call.
        got = app.got("/pressed")
        assert len(got) == 3 and {r.params["Digits"] for r in got} == {"1"}
    finally:
        await asyncio.to_thread(engine.stop)
        await app.stop()


# -- a digest-authenticated trunk -------------------------------------------------------

@pytest.mark.skipif(SIPP is None, reason="sipp is not installed")
@pytest.mark.parametrize("password, code", [("wonderland", "200"), ("mad-hatter", "403")])
def test_trunk_with_digest_credentials_from_a_config(tmp_path, password, code):
    """`trunk:pstn --config FILE`: the trunk's proxy, prefix and credentials. SIPp challenges
    every INVITE (401) and answers only alice/wonderland."""
    port = free_port()
    uas = subprocess.Popen(
        [SIPP, "-sf", os.path.join(ROOT, "tests", "sipp", "uas_digest.xml"),
         "-i", "127.0.0.1", "-p", str(port), "-mi", "127.0.0.1",
         "-mp", str(free_port(even=True)), "-m", "3", "-timeout", "20s", "-nostdin",
         "-max_socket", "50"], cwd=tmp_path, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    config = tmp_path / "trunk.toml"
    config.write_text(f'[trunks.pstn]\nproxy = "127.0.0.1:{port}"\ntransport = "udp"\n'
                      f'username = "alice"\npassword = "{password}"\nprefix = "00"\n')
    try:
        time.sleep(0.3)     # SIPp's socket is bound by then; the UAC retransmits anyway
        r = load(["trunk:pstn", "--config", str(config), "--number", "4420", "--rate", "5",
                  "--calls", "3", "--hold", "0.5", "--no-probe"], tmp_path / "r")
        uas_err = uas.communicate(timeout=30)[1]
    finally:
        if uas.poll() is None:
            uas.kill()
            uas.wait()
    assert r.returncode == 0, r.stderr + uas_err[-2000:]
    s = summary_of(tmp_path / "r")
    assert s["target"].startswith("sip:004420@127.0.0.1")
    assert s["calls"]["codes"] == {code: 3}, uas_err[-2000:]
    if code == "200":
        assert uas.returncode == 0, uas_err[-2000:]      # every BYE arrived, in its dialog
        assert all(row["ended_by"] == "local" for row in rows_of(tmp_path / "r"))
