"""The `baton` command: version, config errors, serve and its graceful stop."""
from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time

import pytest

from engine.config.load import ConfigError, from_dict, load
from tests.helpers import BATON, BlockingPeer, EngineProcess, free_port


def run(*args, timeout=30):
    return subprocess.run([BATON, *args], capture_output=True, text=True, timeout=timeout)


def test_version_and_help():
    r = run("version")
    assert r.returncode == 0 and r.stdout.startswith("baton ")
    r = run("serve", "--help")
    assert r.returncode == 0
    for opt in ("--config", "--sip-addr", "--grpc-addr", "--data-dir"):
        assert opt in r.stdout


@pytest.mark.parametrize("text,key,problem", [
    ('[engine]\nsip_addr = "127.0.0.1:99999"\n', "engine.sip_addr", "bad address"),
    ('[engine]\nsip_port = 5060\n', "engine.sip_port", "unknown key"),
    ('[engine]\ntransports = ["udp", "sctp"]\n', "engine.transports", "unsupported transport"),
    ('[media]\nrtp_port_min = "low"\n', "media.rtp_port_min", "expected int"),
    ('[media]\nrtp_port_min = 30000\nrtp_port_max = 20000\n', "media.rtp_port_min", "rtp_port_max"),
    ('[registrar]\nmode = "maybe"\n', "registrar.mode", "open, auth or off"),
    ('[accounts.a.numbers]\n"1" = { module = "acme.nothing" }\n', "accounts.a.numbers.1.module",
     "unknown module"),
    ('[accounts.a.numbers]\n"1" = "baton.hold"\n[accounts.b.numbers]\n"1" = "baton.hold"\n',
     "accounts.b.numbers.1", "already belongs"),
    ('[users.bob]\npassword = ""\n', "users.bob.password", "non-empty"),
    ('[modules."acme.survey"]\nvendor = "acme"\nlevel = "premium"\n',
     "modules.acme.survey.level", "basic, application or service"),
    ('[nonsense]\n', "nonsense", "unknown section"),
    ('this is = not toml =\n', "-", "invalid TOML"),
])
def test_bad_config_names_file_key_and_problem(text, key, problem):
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
    with pytest.raises(ConfigError) as ei:
        load(f.name)
    assert ei.value.key == key and problem in ei.value.problem
    # The CLI fails at start with the same message and exit code 2.
    addr = [] if key == "engine.sip_addr" else ["--sip-addr", f"127.0.0.1:{free_port()}"]
    r = run("serve", "--config", f.name, *addr)
    assert r.returncode == 2
    assert f.name in r.stderr and key in r.stderr and problem in r.stderr
    os.unlink(f.name)


def test_missing_config_file():
    r = run("serve", "--config", "/nonexistent/baton.toml")
    assert r.returncode == 2 and "/nonexistent/baton.toml: -: file not found" in r.stderr


def test_demo_config_is_valid():
    cfg = load(os.path.join(os.path.dirname(__file__), "..", "examples", "demo.toml"))
    assert "1000" in cfg.numbers and cfg.numbers["1000"].module == "baton.hold"
    assert from_dict({}).sip_port == 5060


def test_serve_answers_and_stops_gracefully_with_calls_in_progress():
    with EngineProcess() as eng:
        peer = BlockingPeer(eng)
        calls = [peer.answered_call() for _ in range(3)]
        t0 = time.monotonic()
        eng.proc.send_signal(15)
        byes = set()
        while len(byes) < 3:
            m = peer.recv()
            assert m.is_request and m.method == "BYE"
            byes.add(m.call_id)
            resp = (f"SIP/2.0 200 OK\r\nVia: {m.get('via')}\r\nFrom: {m.get('from')}\r\n"
                    f"To: {m.get('to')}\r\nCall-ID: {m.call_id}\r\nCSeq: {m.get('cseq')}\r\n"
                    "Content-Length: 0\r\n\r\n").encode()
            peer.send(resp)
        assert byes == {c.call_id for c in calls}
        assert eng.proc.wait(10) == 0
        assert time.monotonic() - t0 < 5
        out = eng.output()
        assert "Traceback" not in out
        peer.close()


def test_serve_stops_even_if_peers_never_answer_bye():
    with EngineProcess() as eng:
        peer = BlockingPeer(eng)
        peer.answered_call()
        t0 = time.monotonic()
        assert eng.stop(timeout=15) == 0
        assert time.monotonic() - t0 < 8  # bounded drain, nothing hangs
        peer.close()


def test_port_in_use_is_reported():
    busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    busy.bind(("127.0.0.1", 0))
    port = busy.getsockname()[1]
    r = run("serve", "--sip-addr", f"127.0.0.1:{port}", "--data-dir", tempfile.mkdtemp())
    busy.close()
    assert r.returncode == 1 and "cannot listen" in r.stderr
    # What did start is let go of in order (no "Unclosed client session" and the like).
    assert "ERROR" not in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_sessions_list_and_history_live_and_finished():
    import json

    with EngineProcess() as eng:
        peer = BlockingPeer(eng)
        call = peer.answered_call()
        time.sleep(0.4)  # the journal commits in batches
        r = run("sessions", "list", "--live", "--data-dir", eng.data_dir, "--format", "json")
        assert r.returncode == 0, r.stderr
        rows = json.loads(r.stdout)
        assert len(rows) == 1 and rows[0]["live"] and rows[0]["module"] == "baton.hold"
        sid = rows[0]["id"]
        peer.hang_up(call)
        time.sleep(0.4)
        r = run("sessions", "history", sid, "--data-dir", eng.data_dir, "--format", "json")
        row = json.loads(r.stdout)
        assert not row["live"] and row["end_reason"] == "hangup"
        assert [(h["module"], h["reason"]) for h in row["history"]] == [("baton.hold", "initial")]
        assert row["history"][0]["end_mono_ns"] > row["history"][0]["start_mono_ns"]
        r = run("sessions", "list", "--data-dir", eng.data_dir)
        assert sid in r.stdout and "ended (hangup)" in r.stdout
        r = run("sessions", "history", "nope", "--data-dir", eng.data_dir)
        assert r.returncode == 1 and "no session" in r.stderr
        peer.close()
    r = run("sessions", "list", "--data-dir", "/nonexistent")
    assert r.returncode == 2 and "no session journal" in r.stderr
