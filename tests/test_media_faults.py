"""Offers whose RTP or RTCP port does not exist get 488, no media timer or callback
raises into the loop, and the engine's memory stays bounded under bad INVITEs."""
from __future__ import annotations

import asyncio
import socket
import struct
import time

import pytest

from tests.helpers import (DEMO, SDP_OFFER, BlockingPeer, Call, EngineProcess, UdpClient,
                           running_engine)

# The m= port (and a=rtcp) of offers no RTCP port can answer: RFC 3550 11 puts RTCP on
# the port after RTP's, and 65535 has none; 0 disables the only stream; the rest do not exist.
BAD_PORTS = [("65535", ""), ("0", ""), ("65536", ""), ("99999", ""), ("40000", "a=rtcp:70000\r\n"),
             ("40000", "a=rtcp:0\r\n")]


def _offer(port: str, extra: str) -> str:
    return SDP_OFFER.replace("{port}", port) + extra


@pytest.mark.parametrize("port, extra", BAD_PORTS, ids=[p + (" rtcp" if e else "")
                                                        for p, e in BAD_PORTS])
async def test_an_offer_without_a_usable_rtcp_port_gets_488(port, extra):
    async with running_engine() as eng:
        c = UdpClient("127.0.0.1", eng.sip_port)
        try:
            c.send(Call(c).request("INVITE", _offer(port, extra)))
            await c.expect(488)
            # The engine goes on: the next call is answered.
            call = Call(c)
            c.send(call.request("INVITE", SDP_OFFER.format(port=40000)))
            ok = await c.expect(200)
            call.to_tag = ok.to_tag
            c.send(call.request("ACK"))
            call.cseq += 1
            c.send(call.request("BYE"))
            await c.expect(200)
        finally:
            c.close()


async def test_a_far_end_sending_from_port_65535_gets_no_rtcp_and_no_fault(caplog):
    """Symmetric RTP latches to where the far end really sends from; from 65535 there
    is no RTCP port: the report is not sent, and the RTCP timer raises nothing."""
    far = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        far.bind(("127.0.0.1", 65535))
    except OSError:
        far.close()
        pytest.skip("port 65535 of 127.0.0.1 is taken")
    far.setblocking(False)
    async with running_engine(raw=None) as eng:
        eng.media.rtcp_interval = 0.1
        eng.media._rtcp_handle.cancel()
        eng.media._rtcp_handle = asyncio.get_running_loop().call_later(0.1, eng.media._rtcp)
        c = UdpClient("127.0.0.1", eng.sip_port)
        try:
            call = Call(c)
            c.send(call.request("INVITE", SDP_OFFER.format(port=40000)))
            ok = await c.expect(200)
            call.to_tag = ok.to_tag
            c.send(call.request("ACK"))
            engine_rtp = int(ok.body.split(b"m=audio ")[1].split()[0])
            for i in range(25):       # the engine latches to 65535 and answers there
                far.sendto(struct.pack("!BBHII", 0x80, 0, i, 160 * i, 0x4242) + b"\xff" * 160,
                           ("127.0.0.1", engine_rtp))
                await asyncio.sleep(0.02)
            leg = next(iter(eng.sessions.values())).legs[0]
            assert leg.stream.remote_addr == ("127.0.0.1", 65535)
            assert leg.stream.stats()["tx_packets"] > 0
            await asyncio.sleep(0.4)  # several RTCP rounds
            call.cseq += 1
            c.send(call.request("BYE"))
            await c.expect(200)
        finally:
            c.close()
            far.close()
    assert not [r for r in caplog.records if r.exc_info], caplog.text


async def test_a_failing_media_callback_is_logged_once_and_the_rest_keeps_running(caplog):
    async with running_engine() as eng:
        eng.media.rtcp_interval = 0.05
        eng.media._rtcp_handle.cancel()
        eng.media._rtcp_handle = asyncio.get_running_loop().call_later(0.05, eng.media._rtcp)
        c = UdpClient("127.0.0.1", eng.sip_port)
        try:
            calls = []
            for _ in range(2):
                call = Call(c)
                c.send(call.request("INVITE", SDP_OFFER.format(port=40000)))
                ok = await c.expect(200)
                call.to_tag = ok.to_tag
                c.send(call.request("ACK"))
                calls.append(call)
            bad, good = list(eng.sessions.values())
            broken = bad.legs[0].stream

            class Broken:                  # a stream whose statistics cannot be read
                remote_addr = ("127.0.0.1", 40000)

                def stats(self):
                    raise RuntimeError("statistics unavailable")

            entry = eng.media.rtcp[id(broken)]
            entry[0] = Broken()
            ticks = eng.media._n
            await asyncio.sleep(0.5)           # about ten RTCP rounds
            assert eng.media._n > ticks + 10   # the media clock kept ticking
            entry[0] = broken
            faults = [r for r in caplog.records if "handler failed" in r.getMessage()]
            assert len(faults) == 1 and bad.id in faults[0].getMessage(), caplog.text
            assert not good.ended and not bad.ended
            for call in calls:
                call.cseq += 1
                c.send(call.request("BYE"))
                await c.expect(200)
        finally:
            c.close()


# -- memory ------------------------------------------------------------------------------
def _bad_invites(port: int, me: int) -> list[tuple[bytes, bytes]]:
    """The same batch every time: INVITEs with ports that do not exist, broken SDP, broken
    headers, each with the ACK for its final answer but the To tag (every one names
    127.0.0.1 only)."""
    out = []
    bodies = [_offer(p, e) for p, e in BAD_PORTS] + [
        "v=0\r\nm=audio\r\n", "v=1\r\n", "garbage", "v=0\r\nc=IN IP4 example.com\r\n"
        "m=audio 40000 RTP/AVP 0\r\n", SDP_OFFER.format(port=40000).replace("0 8 101", "18")]
    for k in range(300):
        body = bodies[k % len(bodies)].encode()
        tag = f"{k}-{time.monotonic_ns()}"
        common = (f"sip:1000@127.0.0.1:{port} SIP/2.0\r\n"
                  f"Via: SIP/2.0/UDP 127.0.0.1:{me};branch=z9hG4bKsoak{tag}\r\n"
                  f"Max-Forwards: 70\r\nFrom: <sip:soak@127.0.0.1>;tag=s{k}\r\n"
                  f"To: <sip:1000@127.0.0.1>{{to_tag}}\r\nCall-ID: soak{tag}@127.0.0.1\r\n")
        head = ("INVITE " + common.format(to_tag="") + "CSeq: 1 INVITE\r\n"
                f"Contact: <sip:soak@127.0.0.1:{me}>\r\nContent-Type: application/sdp\r\n")
        if k % 7 == 3:
            head += "Content-Length: 99999\r\n\r\n"     # a lie: 400
        else:
            head += f"Content-Length: {len(body)}\r\n\r\n"
        # RFC 3261 17.1.1.3: the ACK of a non-2xx answer, on the INVITE's branch.
        ack = "ACK " + common + "CSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
        out.append((head.encode() + body, ack))
    return out


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _batch(eng: EngineProcess) -> None:
    peer = BlockingPeer(eng, timeout=5)
    try:
        for msg, ack in _bad_invites(eng.port, peer.local_port):
            peer.send(msg)
            while True:                 # its final answer (the 488 or 400)
                m = peer.recv()
                if not m.is_request and m.status >= 200:
                    break
            assert m.status in (400, 488), m.status
            to_tag = f";tag={m.to_tag}" if m.to_tag else ""
            peer.send(ack.format(to_tag=to_tag).encode())
    finally:
        peer.close()
    peer = BlockingPeer(eng, timeout=5)
    try:
        for _ in range(100):
            peer.hang_up(peer.answered_call("1000"))
    finally:
        peer.close()


def test_memory_is_bounded_over_the_same_batch_run_twice():
    eng = EngineProcess(DEMO)
    with eng:
        _batch(eng)                     # warms every cache and pool
        time.sleep(1.0)
        first = _rss_kib(eng.proc.pid)
        _batch(eng)
        time.sleep(1.0)
        second = _rss_kib(eng.proc.pid)
        assert eng.stop(timeout=20) == 0
    log = eng.output()
    assert "Traceback" not in log, log[-4000:]
    print(f"engine RSS after the first batch {first} KiB, after the second {second} KiB")
    # Bounded: the second run of the same work may not grow it meaningfully.
    assert second <= first + max(first // 10, 4096), (first, second)
