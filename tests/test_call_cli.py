"""`baton call`, the PJSIP test caller, as a user runs it: a subprocess against
a real `baton serve` on the demo config.

- the echo number with --play and --record: what comes back is what was played;
- DTMF (RFC 4733) into the menu app moves the session, as its history shows;
- a number that does not exist: non-zero exit, the SIP status named;
- digest credentials answer a SIPp UAS's challenge (a wrong password gets its 403);
- bad arguments: exit 2 with what to fix, without PJSIP starting.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import wave

import numpy as np
import pytest

from engine.cli import call as caller
from engine.cli.call import DtmfStep, parse_dtmf, target_uri
from tests.helpers import BATON, ROOT, EngineProcess, free_port, served_demo

RATE = 8000


def baton(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([BATON, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def result_of(p: subprocess.CompletedProcess) -> dict:
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"no RESULT line\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return json.loads(lines[-1][len("RESULT "):])


# -- without an engine ------------------------------------------------------------
def test_dtmf_steps():
    assert parse_dtmf("1@3s,2@6s") == [DtmfStep(3.0, "1"), DtmfStep(6.0, "2")]
    assert parse_dtmf("1+2s, 23+500ms,#") == [DtmfStep(2.0, "1"), DtmfStep(2.5, "23"),
                                               DtmfStep(3.5, "#")]
    assert parse_dtmf("a@1.5") == [DtmfStep(1.5, "A")]
    for bad in ("", "x@1s", "1@soon", "1@5s,2@3s"):
        with pytest.raises(ValueError):
            parse_dtmf(bad)


def test_targets():
    assert target_uri("2000") == "sip:2000@127.0.0.1:5060"
    assert target_uri("2000", "127.0.0.1:5070") == "sip:2000@127.0.0.1:5070"
    assert target_uri("sip:2000@127.0.0.1:5070") == "sip:2000@127.0.0.1:5070"
    assert target_uri("desk@127.0.0.1:5070") == "sip:desk@127.0.0.1:5070"
    with pytest.raises(ValueError):
        target_uri("not a number")


def test_bad_arguments_exit_2_naming_the_option(tmp_path):
    p = baton("call", "2000", "--dtmf", "1@later", timeout=20)
    assert p.returncode == 2 and "--dtmf" in p.stderr, p.stderr
    p = baton("call", "2000", "--play", str(tmp_path / "missing.wav"), timeout=20)
    assert p.returncode == 2 and "no such file" in p.stderr, p.stderr
    p = baton("call", "--help", timeout=20)
    assert p.returncode == 0
    for opt in ("--engine", "--dtmf", "--play", "--record", "--hangup-after", "--user",
                "--password"):
        assert opt in p.stdout, opt


# -- against an engine --------------------------------------------------------------
needs_pjsip = pytest.mark.skipif(caller.pj is None, reason="pjsua2 is not installed")


@pytest.fixture(scope="module")
def engine():
    with served_demo() as eng:
        yield eng


TONE = int(RATE * 0.1)          # samples per tone of the probe


def write_probe(path, seconds: float = 1.6) -> tuple[np.ndarray, np.ndarray]:
    """A WAV of tones whose pitch changes every 100 ms in no regular way, so it
    lines up with a copy of itself at one delay only. Returns the samples and
    the tones' frequencies."""
    rng = np.random.default_rng(7)
    t = np.arange(TONE) / RATE
    freqs = rng.uniform(300, 3000, int(seconds * 10))
    samples = (np.concatenate([np.sin(2 * np.pi * f * t) for f in freqs]) * 9000).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(samples.tobytes())
    return samples.astype(float), freqs


def dominant(x: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x)), 8 * len(x)))
    return float(np.argmax(spectrum)) * RATE / (8 * len(x))


def read_wav(path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(float), \
            w.getframerate()


def addresses(log_path) -> set[str]:
    with open(log_path, errors="replace") as f:
        text = f.read()
    return set(re.findall(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d.])", text))


@pytest.mark.interop
@needs_pjsip
def test_echo_returns_what_was_played(engine, tmp_path):
    played, freqs = write_probe(tmp_path / "in.wav")
    out, log = tmp_path / "out.wav", tmp_path / "pjsip.log"
    p = baton("call", "1001", "--engine", f"127.0.0.1:{engine.port}", "--play",
              str(tmp_path / "in.wav"), "--record", str(out), "--hangup-after", "3",
              "--log", str(log), "--json")
    report = f"stdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    assert p.returncode == 0, report
    r = result_of(p)
    assert r["answered"] and r["status"] == 200, report
    assert r["hung_up_by"] == "us" and r["bye_status"] == 200, report
    assert r["duration"] >= 3.0, report
    # RTP counted by PJSIP's stream: 20 ms packets both ways for 3 s, the echo's back.
    m = r["media"]
    assert m["rtp_sent"] >= 140 and m["rtp_received"] >= 0.9 * m["rtp_sent"], m
    assert m["rtp_lost"] <= 0.05 * m["rtp_sent"], m
    for line in ("answered (200 OK)", "playing ", "recording what comes back",
                 "hung up by us", "media: ", "call ended: INVITE 200 OK"):
        assert line in p.stdout, report
    # PJSIP never advertised nor used any address but loopback.
    assert addresses(log) == {"127.0.0.1"}, addresses(log)

    got, rate = read_wav(out)
    assert rate == RATE and len(got) >= 2.5 * RATE, (rate, len(got))
    # The played probe is in the recording one round trip later: it lines up with
    # the probe at one delay, and there each tone is back at its own pitch. (A busy
    # host may cost a packet here and there, which PJSIP conceals: so tone by tone
    # rather than one correlation figure.)
    c = np.correlate(got, played, "valid")
    lag = int(np.argmax(np.abs(c)))
    assert lag < RATE // 2, f"echo {lag / RATE:.3f} s late"
    heard = [dominant(got[lag + i * TONE + 20:lag + (i + 1) * TONE - 20])
             for i in range(len(freqs))]
    same = [abs(h - f) < 25 for h, f in zip(heard, freqs)]
    assert sum(same) >= 0.75 * len(freqs), list(zip(freqs.round(), np.round(heard)))


def _journal(engine: EngineProcess, number: str, count: int, timeout: float = 5.0) -> list:
    """The ended sessions to `number` once `count` are in the journal."""
    deadline = time.monotonic() + timeout
    while True:
        p = baton("sessions", "list", "--data-dir", engine.data_dir, "--format", "json",
                  timeout=20)
        assert p.returncode == 0, p.stderr
        rows = [r for r in json.loads(p.stdout) if r["number"] == number and not r["live"]]
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


@pytest.mark.interop
@needs_pjsip
def test_dtmf_moves_the_menu_session(engine, tmp_path):
    before = len(_journal(engine, "2000", 0, timeout=0))
    p = baton("call", "2000", "--engine", f"127.0.0.1:{engine.port}", "--dtmf", "1@1.5s",
              "--hangup-after", "4", "--json")
    report = f"stdout:\n{p.stdout}\nstderr:\n{p.stderr}\nengine:\n{engine.output()[-3000:]}"
    assert p.returncode == 0, report
    r = result_of(p)
    assert [d["digits"] for d in r["dtmf_sent"]] == ["1"], report
    assert "DTMF sent: 1 (RFC 4733)" in p.stdout, report
    rows = _journal(engine, "2000", before + 1)
    assert len(rows) == before + 1, rows
    p = baton("sessions", "history", rows[0]["id"], "--data-dir", engine.data_dir,
              "--format", "json", timeout=20)
    h = json.loads(p.stdout)
    # Key 1 at the menu is its outlet "1": the bridge to the echo desk.
    assert [(x["module"], x["reason"]) for x in h["history"]] == [
        ("baton.menu", "initial"), ("baton.bridge", "outlet:1")], h


@pytest.mark.interop
@needs_pjsip
def test_unknown_number_fails_naming_the_status(engine):
    p = baton("call", "9999", "--engine", f"127.0.0.1:{engine.port}", "--json")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "404 Not Found" in p.stderr, p.stderr
    assert "call failed: 404 Not Found" in p.stdout, p.stdout
    r = result_of(p)
    assert not r["answered"] and r["status"] == 404, r


@pytest.mark.interop
@needs_pjsip
@pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp is not installed")
@pytest.mark.parametrize("password, status", [("wonderland", 200), ("mad-hatter", 403)])
def test_digest_credentials_answer_a_challenge(tmp_path, password, status):
    port = free_port()
    uas = subprocess.Popen(
        ["sipp", "-sf", os.path.join(ROOT, "tests", "sipp", "uas_digest.xml"),
         "-i", "127.0.0.1", "-p", str(port), "-mi", "127.0.0.1", "-mp", str(free_port(even=True)),
         "-m", "1", "-timeout", "20s", "-timeout_error", "-nostdin", "-max_socket", "50"],
        cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)     # SIPp's socket is bound by then; PJSIP retransmits anyway
        p = baton("call", f"sip:desk@127.0.0.1:{port}", "--user", "alice", "--password",
                  password, "--hangup-after", "1", "--json")
        uas_err = uas.communicate(timeout=20)[1]
    finally:
        if uas.poll() is None:
            uas.kill()
            uas.wait()
    report = f"stdout:\n{p.stdout}\nstderr:\n{p.stderr}\nsipp:\n{uas_err[-2000:]}"
    r = result_of(p)
    assert r["status"] == status, report
    if status == 200:
        assert p.returncode == 0 and r["answered"] and r["bye_status"] == 200, report
        assert uas.returncode == 0, report
    else:
        assert p.returncode == 1 and "403 Forbidden" in p.stderr, report
