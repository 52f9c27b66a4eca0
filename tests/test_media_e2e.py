"""Media proofs with PJSIP: audio goes through the engine and comes back.

A pjsua2 endpoint (tests/pjsip_media.py, one child process per call) plays
a few seconds of speech into the call and records what the engine sends
back; the test cross-correlates the two. The echo (1001) must return the
caller's audio; through 1002 the same audio crosses the relay twice (caller
leg -> the engine's own call to 1001 -> back), so a good correlation proves
the bridge carries audio both ways. The demo's menu (2000) must take key 1
sent as RFC 4733 events and bridge the caller into that echo.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import wave

import numpy as np
import pytest

from tests.helpers import BATON, ROOT, EngineProcess

pytest.importorskip("pjsua2")

pytestmark = pytest.mark.interop

PEER = os.path.join(ROOT, "tests", "pjsip_media.py")
RATE = 8000
MAX_DELAY = 0.5          # seconds: a round trip on loopback is far below this
MIN_CORRELATION = 0.6


# -- the engine -------------------------------------------------------------------
def finish_engine(engine: EngineProcess) -> None:
    """The engine survived the peer: it answers OPTIONS, stops cleanly on
    SIGTERM and logged no traceback."""
    answered = any(engine._options_answered() for _ in range(5))
    code = engine.stop()
    out = engine.output()
    assert answered, f"engine stopped answering OPTIONS:\n{out}"
    assert code == 0, f"engine exited with {code} on SIGTERM:\n{out}"
    assert "Traceback" not in out, out


def settled_sessions(engine: EngineProcess, count: int, timeout: float = 5.0) -> list[dict]:
    """`baton sessions list` once `count` sessions are journaled and ended
    (the journal commits a moment after the calls end)."""
    deadline = time.monotonic() + timeout
    while True:
        p = subprocess.run([BATON, "sessions", "list", "--data-dir", engine.data_dir,
                            "--format", "json"], capture_output=True, text=True, timeout=20)
        assert p.returncode == 0, p.stderr
        rows = json.loads(p.stdout)
        if (len(rows) >= count and not any(r["live"] for r in rows)) \
                or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


# -- audio ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> str:
    """About three seconds of speech as an 8 kHz mono 16-bit WAV; a chirp
    where espeak-ng or sox is missing."""
    out = tmp_path_factory.mktemp("media") / "speech-8k.wav"
    espeak, sox = shutil.which("espeak-ng"), shutil.which("sox")
    if espeak and sox:
        raw = out.with_name("speech-raw.wav")
        subprocess.run([espeak, "-v", "en", "-s", "160", "-w", str(raw),
                        "The quick brown fox jumps over the lazy dog."],
                       check=True, capture_output=True, timeout=30)
        subprocess.run([sox, str(raw), "-r", str(RATE), "-c", "1", "-b", "16", str(out)],
                       check=True, capture_output=True, timeout=30)
    else:
        t = np.arange(3 * RATE) / RATE
        chirp = np.sin(2 * np.pi * (200 * t + (3000 - 200) / 6 * t * t)) * 12000
        _write_wav(out, chirp.astype(np.int16))
    return str(out)


def _write_wav(path, pcm: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm.astype("<i2").tobytes())


def read_wav(path) -> np.ndarray:
    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (RATE, 1, 2), path
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float64)


def echo_correlation(sent: np.ndarray, got: np.ndarray, max_lag: int) -> tuple[float, int]:
    """The best normalized correlation of `sent` with `got` delayed by 0..max_lag
    samples: sum(s[n] * g[n + lag]) / sqrt(sum(s^2) * sum(g[lag:lag+N]^2)),
    1.0 for an exact (scaled) copy. Returns (peak, lag in samples)."""
    n = len(sent)
    got = np.pad(got[:n + max_lag], (0, max(0, n + max_lag - len(got))))
    size = 1 << int(np.ceil(np.log2(n + len(got))))
    num = np.fft.irfft(np.conj(np.fft.rfft(sent, size)) * np.fft.rfft(got, size), size)
    num = num[:max_lag + 1]
    energy = np.concatenate(([0.0], np.cumsum(got * got)))
    lags = np.arange(max_lag + 1)
    window = energy[lags + n] - energy[lags]
    r = num / np.sqrt(np.sum(sent * sent) * np.maximum(window, 1e-9))
    k = int(np.argmax(r))
    return float(r[k]), k


# -- the PJSIP child --------------------------------------------------------------
def run_media(scenario: str, engine: EngineProcess, tmp_path, number: str, *args) -> dict:
    log = tmp_path / f"pjsip-{scenario}-{number}.log"
    cmd = [sys.executable, PEER, scenario, "--engine", f"127.0.0.1:{engine.port}",
           "--number", number, "--log", str(log), *args]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"PJSIP peer hung in {scenario!r}:\n{exc.stdout}\n{exc.stderr}\n"
                    f"{_tail(log)}\nengine:\n{engine.output()}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    context = (f"exit {proc.returncode}\nstderr:\n{proc.stderr[-3000:]}\n"
               f"PJSIP log:\n{_tail(log)}\nengine:\n{engine.output()[-3000:]}")
    assert lines, f"PJSIP peer printed no result\n{context}"
    result = json.loads(lines[-1][len("RESULT "):])
    assert "error" not in result, f"{result['error']}\n{result.get('traceback', '')}\n{context}"
    assert proc.returncode == 0, context
    result["_context"] = context
    return result


def _tail(path, n: int = 12000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return "(no log)"


def echo_windows(sent: np.ndarray, got: np.ndarray, max_lag: int,
                 window: int = RATE // 4) -> list[tuple[float, int]]:
    """(peak, lag) of `echo_correlation` for each quarter second of `sent`
    that carries speech, against the recording from that point on."""
    floor = 0.1 * np.sqrt(np.mean(sent * sent))
    out = []
    for start in range(0, len(sent) - window + 1, window):
        part = sent[start:start + window]
        if np.sqrt(np.mean(part * part)) < floor:
            continue  # a pause: nothing to find in the echo
        out.append(echo_correlation(part, got[start:], max_lag))
    return out


def assert_echoed(speech: str, recorded, r: dict) -> dict:
    """The recording holds the speech, back after a plausible delay.

    Judged per quarter second as well as over the whole: the round trip
    may step by a frame (20 ms) mid-call when a packet lands just after the
    far end's 20 ms tick, and one lag for the whole recording then only
    matches the part before or after the step."""
    sent, got = read_wav(speech), read_wav(recorded)
    assert len(got) >= len(sent), f"recording too short: {len(got)} < {len(sent)} samples"
    max_lag = int(MAX_DELAY * RATE)
    peak, lag = echo_correlation(sent, got, max_lag)
    windows = echo_windows(sent, got, max_lag)
    good = [(p, k) for p, k in windows if p >= MIN_CORRELATION and k < max_lag]
    summary = {
        "whole": (round(peak, 4), lag * 1000 // RATE),
        "windows": len(windows), "good": len(good),
        "worst": round(min(p for p, _ in windows), 4) if windows else None,
        "delays_ms": sorted({k * 1000 // RATE for _, k in good}),
        "stream": {k: r.get(k) for k in ("codec", "rx_packets", "tx_packets", "rx_lost")},
    }
    where = json.dumps(summary)
    assert len(windows) >= 6, where
    # The speech came back, nearly all of it, in under half a second.
    assert len(good) >= 0.8 * len(windows), where
    print(f"\n{os.path.basename(str(recorded))}: {where}")
    return summary


# -- the tests --------------------------------------------------------------------
@pytest.mark.parametrize("number, sessions", [
    # The echo module answers and loops the caller's audio back.
    ("1001", {"1001": "baton.echo"}),
    # A plain bridge to the engine's own 1001: the caller's leg relays to the
    # dialled leg, which is the echo's caller leg, and back.
    ("1002", {"1002": "baton.bridge", "1001": "baton.echo"}),
])
def test_echo_returns_the_callers_audio(tmp_path, speech, number, sessions):
    recorded = tmp_path / f"back-{number}.wav"
    with EngineProcess() as engine:
        r = run_media("echo", engine, tmp_path, number, "--play", speech,
                      "--record", str(recorded))
        assert r["states"][-1] == "DISCONNECTED" and "CONFIRMED" in r["states"], r["_context"]
        assert r["bye_responses"] == [200], r["_context"]
        assert r["addresses"] == ["127.0.0.1"], r["_context"]
        assert_echoed(speech, recorded, r)
        rows = settled_sessions(engine, len(sessions))
        assert {row["number"]: row["module"] for row in rows} == sessions, rows
        assert len(rows) == len(sessions), rows
        assert all(not row["live"] and row["end_reason"] for row in rows), rows
        finish_engine(engine)


def test_held_call_sends_nothing_back(tmp_path, speech):
    """The control for the measure above: 1000 holds the call and sends
    silence, so what PJSIP records must not correlate with what it played
    (the recorder hears the far end, not the local player)."""
    recorded = tmp_path / "back-1000.wav"
    with EngineProcess() as engine:
        r = run_media("echo", engine, tmp_path, "1000", "--play", speech,
                      "--record", str(recorded))
        assert r["rx_packets"] > 100, r["_context"]
        sent, got = read_wav(speech), read_wav(recorded)
        assert len(got) >= len(sent), r["_context"]
        peak, lag = echo_correlation(sent, got, int(MAX_DELAY * RATE))
        assert peak < 0.2, f"correlation {peak:.4f} at {lag * 1000 / RATE:.0f} ms"
        finish_engine(engine)


def test_menu_takes_rfc4733_key_and_bridges_to_the_echo(tmp_path, speech):
    """2000: PJSIP presses 1 during the prompt with `dialDtmf` (RFC 4733),
    the menu hands the call to the bridge, and the echo behind it sends the
    caller's speech back."""
    recorded = tmp_path / "back-2000.wav"
    with EngineProcess() as engine:
        r = run_media("dtmf", engine, tmp_path, "2000", "--key", "1", "--before", "1.5",
                      "--after", "1.5", "--play", speech, "--record", str(recorded))
        ctx = r["_context"]
        assert r["states"][-1] == "DISCONNECTED" and "CONFIRMED" in r["states"], ctx
        assert r["bye_responses"] == [200], ctx
        # The prompt was playing when the key went out.
        assert r["before_key"]["rx_packets"] > 50, ctx
        rows = settled_sessions(engine, 2)
        assert len(rows) == 2, rows
        caller = next(row for row in rows if row["number"] == "2000")
        echo = next(row for row in rows if row["number"] == "1001")
        assert [(h["module"], h["reason"]) for h in caller["history"]] == \
            [("baton.menu", "initial"), ("baton.bridge", "outlet:1")], caller
        assert [(h["module"], h["reason"]) for h in echo["history"]] == \
            [("baton.echo", "initial")], echo
        assert all(not row["live"] and row["end_reason"] for row in rows), rows
        assert_echoed(speech, recorded, r)
        finish_engine(engine)
