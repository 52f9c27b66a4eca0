"""`kill -9` of a loaded engine: after the restart, the session journal lists every
session the ring stamped and the ledger billed, each with its history and an end
(`engine-stopped` at its last stamp for the calls that were in flight)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time

import msgpack
import pytest

from ext.ring_py import retained, ring_info
from engine.sessions.journal import ENGINE_STOPPED, list_sessions
from tests.helpers import BATON, DEMO, EngineProcess, free_port

pytestmark = pytest.mark.interop

SIPP = shutil.which("sipp")


def _stamps(data_dir: str) -> dict[str, dict]:
    """Per session in the ring: its last stamp's wall time and its end stamp, if any."""
    out: dict[str, dict] = {}
    for _seq, payload in retained(os.path.join(data_dir, "ring", "ring.dat")):
        rec = msgpack.unpackb(payload)
        if rec.get("type") not in ("session", "transition"):
            continue
        st = out.setdefault(rec["session"], {"last_wall": 0, "end": None, "transitions": 0})
        st["last_wall"] = rec["wall_ns"]
        if rec["type"] == "transition":
            st["transitions"] += 1
        elif rec["kind"] == "end":
            st["end"] = rec
    return out


def _position(db: str) -> int:
    try:
        conn = sqlite3.connect(db, timeout=10)
        try:
            row = conn.execute("SELECT max(seq) FROM positions").fetchone()
        finally:
            conn.close()
    except sqlite3.OperationalError:
        return 0
    return (row[0] or 0) if row else 0


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(180)
@pytest.mark.skipif(SIPP is None, reason="needs SIPp (Debian package sip-tester)")
def test_journal_lists_every_billed_session_after_kill_9(tmp_path):
    eng = EngineProcess(DEMO)
    data = eng.data_dir
    sipp = None
    try:
        eng.wait_ready()
        # Calls arrive all the time and last 2 s: at the kill some have just
        # started, many are in flight and many have ended.
        sipp = subprocess.Popen(
            [SIPP, f"127.0.0.1:{eng.port}", "-sn", "uac", "-s", "1000", "-r", "40", "-d", "2000",
             "-m", "2000", "-i", "127.0.0.1", "-p", str(free_port()), "-mi", "127.0.0.1",
             "-mp", str(free_port(even=True)), "-t", "u1", "-max_socket", "200", "-nostdin",
             "-trace_err", "-error_file", str(tmp_path / "sipp-errors.log")],
            cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                ended = list_sessions(data, live=False, limit=200)
            except (FileNotFoundError, sqlite3.OperationalError):
                ended = []
            if len(ended) >= 100:
                break
            time.sleep(0.2)
        assert len(ended) >= 100, eng.output()[-3000:]
        m = re.search(r"accountant started \(pid (\d+)", eng.output())
        assert m, eng.output()[-3000:]
        eng.proc.send_signal(signal.SIGKILL)
        eng.proc.wait()
        sipp.kill()
        sipp.wait()
        # The accountant notices its engine is gone and stops after its batch.
        _wait_gone(int(m.group(1)), 30)
    finally:
        if sipp is not None and sipp.poll() is None:
            sipp.kill()
            sipp.wait()
        if eng.proc.poll() is None:
            eng.proc.kill()
            eng.proc.wait()
    stamps = _stamps(data)
    in_flight = [sid for sid, st in stamps.items() if st["end"] is None]
    assert len(in_flight) >= 5, "the kill should land while calls are in flight"

    again = EngineProcess(DEMO, extra=["--data-dir", data])
    try:
        again.wait_ready()
        ring = os.path.join(data, "ring", "ring.dat")
        db = os.path.join(data, "accounting", "ledger.db")
        deadline = time.monotonic() + 60
        while _position(db) < ring_info(ring)["written"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _position(db) == ring_info(ring)["written"]
        assert again.stop(timeout=20) == 0
    finally:
        if again.proc.poll() is None:
            again.proc.kill()
            again.proc.wait()
    assert "Traceback" not in again.output(), again.output()[-4000:]

    r = subprocess.run([BATON, "sessions", "list", "--data-dir", data, "--format", "json",
                        "--limit", "100000"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    listed = {row["id"]: row for row in json.loads(r.stdout)}
    conn = sqlite3.connect(db)
    try:
        billed = {s for (s,) in conn.execute("SELECT DISTINCT session FROM txns "
                                             "WHERE session != ''")}
    finally:
        conn.close()
    assert billed, "the ledger should hold the calls"
    assert not billed - set(listed), sorted(billed - set(listed))[:10]
    assert not set(stamps) - set(listed), sorted(set(stamps) - set(listed))[:10]
    wrong = []
    for sid, st in stamps.items():
        row = listed[sid]
        hist = row["history"]
        if st["end"] is None:
            want = (ENGINE_STOPPED, st["last_wall"])
        else:
            want = (st["end"]["reason"], st["end"]["wall_ns"])
        got = (row["end_reason"], row["ended_wall_ns"])
        if (got != want or len(hist) < st["transitions"] or not hist
                or hist[-1]["end_wall_ns"] != row["ended_wall_ns"]):
            wrong.append((sid, got, want, len(hist), st["transitions"]))
    assert not wrong, wrong[:10]
    shutil.rmtree(data, ignore_errors=True)
