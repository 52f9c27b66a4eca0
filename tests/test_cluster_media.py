"""A PJSIP caller through Kamailio to a cluster node (issue 19, docs/cluster.md): the
front door is the Kamailio config `baton cluster up` writes (deploy/kamailio/), in front
of two real `baton serve` nodes on 127.0.0.11 and .12. The call is signalled through the
proxy, but the node answers with its own loopback address in its SDP, so RTP flows
between the caller and that node directly, both ways, and the echo comes back."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from engine.cli.cluster import MODULES, _options_ok, dispatcher_list, render_kamailio
from tests.helpers import BATON, ROOT, EngineProcess, free_port
from tests.test_media_e2e import assert_echoed, speech  # noqa: F401

pytest.importorskip("pjsua2")
KAMAILIO = shutil.which("kamailio") or ("/usr/sbin/kamailio" if os.path.exists("/usr/sbin/kamailio")
                                        else None)
pytestmark = [pytest.mark.interop, pytest.mark.skipif(not KAMAILIO, reason="needs kamailio")]
PEER = os.path.join(ROOT, "tests", "pjsip_media.py")
FRONT = "127.0.0.10"
NODES = {"node1": "127.0.0.11", "node2": "127.0.0.12"}


@pytest.fixture
def front_door(tmp_path):
    """Two nodes, then Kamailio in front of them: (front HOST:PORT, {node id: engine})."""
    engines = {nid: EngineProcess(host=addr, extra=["--node-id", nid, "--media-addr", addr])
               for nid, addr in NODES.items()}
    kamailio = None
    try:
        for e in engines.values():
            e.wait_ready(30)
        port = free_port(host=FRONT)
        ds = tmp_path / "dispatcher.list"
        ds.write_text(dispatcher_list([{"id": nid, "address": e.host, "sip_port": e.port}
                                       for nid, e in engines.items()]))
        cfg = tmp_path / "kamailio.cfg"
        cfg.write_text(render_kamailio(FRONT, port, str(ds), 1, 4))
        rundir = tmp_path / "kamailio-run"
        rundir.mkdir()
        log = open(tmp_path / "kamailio.log", "wb")
        kamailio = subprocess.Popen([KAMAILIO, "-DD", "-E", "-f", str(cfg), "-L", MODULES,
                                     "-Y", str(rundir), "-P", str(rundir / "kamailio.pid")],
                                    stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 15
        while not _options_ok(FRONT, port):
            assert kamailio.poll() is None, (tmp_path / "kamailio.log").read_text()
            assert time.monotonic() < deadline, "Kamailio did not answer OPTIONS"
            time.sleep(0.1)
        yield f"{FRONT}:{port}", engines
    finally:
        if kamailio is not None and kamailio.poll() is None:
            kamailio.terminate()
            try:
                kamailio.wait(10)
            except subprocess.TimeoutExpired:
                kamailio.kill()
                kamailio.wait()
        for e in engines.values():
            try:
                e.stop(20)
            finally:
                e.__exit__()


def _sessions(engine: EngineProcess) -> list[dict]:
    p = subprocess.run([BATON, "sessions", "list", "--data-dir", engine.data_dir, "--format",
                        "json"], capture_output=True, text=True, timeout=20, check=True)
    return json.loads(p.stdout)


def _answer_sdp(log: str) -> str:
    """The SDP of the 200 OK to the INVITE that PJSIP received (its log of messages)."""
    for m in re.finditer(r"RX \d+ bytes Response msg 200/INVITE/.*?\n(SIP/2\.0 200.*?)\n--end msg--",
                         log, re.S):
        return m.group(1).split("\r\n\r\n", 1)[-1] if "\r\n\r\n" in m.group(1) \
            else m.group(1).split("\n\n", 1)[-1]
    raise AssertionError("no 200 OK to the INVITE in the PJSIP log")


def test_a_pjsip_call_through_kamailio_has_media_straight_to_the_node(front_door, tmp_path,
                                                                      speech):  # noqa: F811
    front, engines = front_door
    recorded, log = tmp_path / "back.wav", tmp_path / "pjsip.log"
    cmd = [sys.executable, PEER, "echo", "--engine", front, "--number", "1001",
           "--play", speech, "--record", str(recorded), "--log", str(log)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    text = log.read_text(errors="replace") if log.exists() else "(no log)"
    context = (f"exit {proc.returncode}\n{proc.stderr[-2000:]}\nPJSIP log:\n{text[-6000:]}\n"
               + "\n".join(f"{nid}:\n{e.output()[-2000:]}" for nid, e in engines.items()))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines and proc.returncode == 0, context
    r = json.loads(lines[-1][len("RESULT "):])
    assert "error" not in r, context
    assert "CONFIRMED" in r["states"] and r["bye_responses"] == [200], context

    # Which node took the call (round-robin): its journal holds the one session.
    deadline = time.monotonic() + 10
    while True:
        rows = {nid: _sessions(e) for nid, e in engines.items()}
        owners = [nid for nid, got in rows.items() if got]
        if len(owners) == 1 and not any(s["live"] for s in rows[owners[0]]):
            break
        assert time.monotonic() < deadline, rows
        time.sleep(0.2)
    owner = owners[0]
    [session] = rows[owner]
    assert session["number"] == "1001" and session["module"] == "baton.echo", session
    address = NODES[owner]

    # Signalling went through the proxy; the node answered with its own address.
    assert f"Record-Route: <sip:{front}" in text, context
    sdp = _answer_sdp(text)
    assert f"c=IN IP4 {address}" in sdp, sdp
    assert set(re.findall(r"IN IP4 (\S+)", sdp)) == {address}, sdp      # o= and c= alike
    assert r["remote_rtp"].rsplit(":", 1)[0] == address, r
    # RTP both ways, straight between the caller and the node: every 20 ms packet of the
    # ~3 s sent and as many back, the speech echoed.
    assert r["tx_packets"] >= 150 and r["rx_packets"] >= 150, r
    print(f"\nthrough Kamailio to {owner}: remote RTP {r['remote_rtp']}, "
          f"{r['tx_packets']} packets sent, {r['rx_packets']} received, {r['rx_lost']} lost")
    assert_echoed(speech, recorded, r)
    for e in engines.values():
        assert "Traceback" not in e.output(), e.output()
