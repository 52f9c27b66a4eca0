"""Issue 15, the engine as an RTP flood: media goes to an SDP address only once
the far end has sent from there (RFC 4961 latching), unless the address is
where the signalling came from or the peer is a trusted trunk; INVITEs in
setup are limited per source address."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from tests.helpers import DEMO, SDP_OFFER, Call, EngineProcess, UdpClient, engine_config, \
    running_engine
from tests.netns import Netns, NetnsUnavailable

PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rtp_aim_peer.py")
VICTIM = "192.0.2.66"      # TEST-NET-1, an address of the namespace's lo only
TRUNK = "127.0.0.2"        # the trusted trunk's signalling address


@pytest.fixture
def netns():
    ns = Netns("baton-rtp")
    try:
        ns.create()
        ns.run(["ip", "addr", "add", f"{VICTIM}/32", "dev", "lo"], check=True,
               capture_output=True)
    except (NetnsUnavailable, subprocess.CalledProcessError) as exc:
        ns.destroy()
        pytest.skip(f"needs a loopback-only network namespace: {exc}")
    try:
        yield ns
    finally:
        ns.destroy()


def _aim(ns, source: str) -> dict:
    r = ns.run([sys.executable, PEER, "127.0.0.1:5070", "1000", VICTIM, source],
               capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


@pytest.mark.netns
def test_sdp_address_alone_gets_no_media_until_the_caller_sends(netns):
    with open(DEMO) as f:
        demo = f.read()
    cfg = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    cfg.write(demo + f'\n[trunks.carrier]\nproxy = "{TRUNK}:5060"\ntrusted = true\n')
    cfg.close()
    eng = EngineProcess(cfg.name, port=5070, netns=netns.name)
    try:
        eng.wait_ready()
        got = _aim(netns, "127.0.0.1")
        assert got["status"] == 200 and got["victim_reachable"], got
        # Old engines sent ~50 packets a second to whatever c= named.
        assert got["to_victim_before"] == 0, got
        assert got["to_caller"] > 10, got       # latched to where A's RTP came from
        assert got["to_victim_after"] == 0, got
        # A trusted trunk's SDP address gets media at once (no latching wait).
        trusted = _aim(netns, TRUNK)
        assert trusted["status"] == 200 and trusted["to_victim_before"] > 10, trusted
        assert eng.proc.poll() is None
    finally:
        if eng.proc.poll() is None:
            eng.proc.kill()
            eng.proc.wait()
        shutil.rmtree(eng.data_dir, ignore_errors=True)
        os.unlink(cfg.name)


async def test_invites_in_setup_are_limited_per_source():
    pytest.importorskip("ext.rtp", reason="ext.rtp is not built (make build)")
    raw = engine_config()
    raw["security"] = {"max_setup_per_source": 3}
    async with running_engine(raw) as eng:
        clients = [UdpClient("127.0.0.1", eng.sip_port) for _ in range(5)]
        calls = [Call(c, "1000") for c in clients]
        answers = []
        for n, (c, call) in enumerate(zip(clients, calls)):
            c.send(call.request("INVITE", SDP_OFFER.format(port=4000 + 2 * n)))
            answers.append(await c.expect(200 if n < 3 else 503, timeout=5))
        assert [m.status for m in answers] == [200, 200, 200, 503, 503]
        # An acknowledged call is no longer in setup: the source may call again.
        calls[0].to_tag = answers[0].to_tag
        clients[0].send(calls[0].request("ACK"))
        again = Call(clients[3], "1000")
        await asyncio.sleep(0.1)
        clients[3].send(again.request("INVITE", SDP_OFFER.format(port=4020)))
        assert (await clients[3].expect(200, timeout=5)).status == 200
        for c in clients:
            c.close()
