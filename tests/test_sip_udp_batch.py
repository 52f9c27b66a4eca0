"""SIP over UDP in batches: recvmmsg in, sendmmsg out (engine/sip/transport.py)."""
from __future__ import annotations

import asyncio
import socket

import pytest

from engine.sip.transaction import Flow
from engine.sip.transport import UdpTransport, _batch_io
from tests.helpers import SDP_OFFER, Call, UdpClient, running_engine

pytestmark = pytest.mark.skipif(_batch_io() is None, reason="the RTP extension is not built")


def test_recv_and_send_datagrams_round_trip():
    recv, send = _batch_io()
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for s in (a, b):
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
        assert recv(a.fileno()) == []
        to = ("127.0.0.1", a.getsockname()[1])
        items = [(b"datagram %d" % i, to) for i in range(100)]
        assert send(b.fileno(), items) == 100
        first, second = recv(a.fileno()), recv(a.fileno())
        assert len(first) == 64 and len(second) == 36          # 64 per call at most
        got = first + second
        assert [d for d, _ in got] == [d for d, _ in items]    # in order
        assert {addr for _, addr in got} == {("127.0.0.1", b.getsockname()[1])}
        assert got[0][1] is got[-1][1]                          # one address tuple per peer
        # An item the socket cannot send stops the batch there: its index comes back.
        assert send(b.fileno(), [(b"x", to), (b"y", ("::1", 5)), (b"z", to)]) == 1
        assert [d for d, _ in recv(a.fileno())] == [b"x"]
        # A name is not an address sendmmsg can take: the batch stops before it too.
        assert send(b.fileno(), [(b"x", to), (b"y", ("localhost", to[1]))]) == 1
        assert send(b.fileno(), [(b"y", ("localhost", to[1]))]) == 0
        assert [d for d, _ in recv(a.fileno())] == [b"x"]
    finally:
        a.close()
        b.close()


class _Core:
    """What a UdpTransport needs of the SIP core, recording what reaches it."""

    udp_rcvbuf = 1 << 20

    def __init__(self):
        from engine.sip.overload import Overload

        self.overload = Overload()
        self.seen: list[bytes] = []
        self.reply = None          # callable(data, flow) run for each datagram

    def on_message(self, data, flow, stream):
        self.seen.append(data)
        if self.reply is not None:
            self.reply(data, flow)


async def test_answers_gathered_in_a_batch_leave_in_the_engines_order():
    loop = asyncio.get_running_loop()
    core = _Core()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    udp = UdpTransport(core, sock)
    assert udp.start(loop)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.setblocking(False)
    batches = []

    def reply(data, flow: Flow):
        batches.append(udp.batch is not None)
        flow.send_or_drop(b"answer to " + data)          # gathered
        if data == b"3":
            flow.send(b"request after 3")                # sends what was gathered first
        flow.send_or_drop(b"late answer to " + data)

    core.reply = reply
    try:
        for i in range(5):       # all queued before the loop looks: one batch
            peer.sendto(b"%d" % i, udp.local)
        for _ in range(100):
            if len(core.seen) == 5:
                break
            await asyncio.sleep(0.01)
        assert core.seen == [b"0", b"1", b"2", b"3", b"4"] and all(batches)
        assert udp.batch is None
        got = []
        for _ in range(100):
            try:
                got.append(peer.recv(100))
            except BlockingIOError:
                if len(got) == 11:
                    break
                await asyncio.sleep(0.01)
        expected = []
        for i in range(5):
            expected.append(b"answer to %d" % i)
            if i == 3:
                expected.append(b"request after 3")
            expected.append(b"late answer to %d" % i)
        assert got == expected
        # Outside a batch a send goes at once.
        Flow(udp, peer.getsockname()).send_or_drop(b"now")
        await asyncio.sleep(0.05)
        assert peer.recv(100) == b"now"
        # A gathered answer to a name (not an address) still goes, on its own.
        udp._flush([(b"to an address", peer.getsockname()),
                    (b"to a name", ("localhost", peer.getsockname()[1])),
                    (b"after it", peer.getsockname())])
        await asyncio.sleep(0.05)
        assert [peer.recv(100) for _ in range(3)] == [b"to an address", b"to a name",
                                                     b"after it"]
    finally:
        udp.close()
        peer.close()
    assert sock.fileno() == -1 and core.overload.sockets == []


async def test_a_burst_of_calls_is_answered_through_batches():
    async with running_engine() as eng:
        udp = eng.sip.udp[0]
        recv, send = udp._io
        sizes = []

        def counting(fd, limit=64):
            got = recv(fd, limit)
            sizes.append(len(got))
            return got

        udp._io = (counting, send)
        c = UdpClient("127.0.0.1", eng.sip_port)
        # 25: under the per-source limit on calls in setup ([security] max_setup_per_source)
        calls = [Call(c, "1000") for _ in range(25)]
        for call in calls:             # every INVITE is queued before the engine reads one
            c.send(call.request("INVITE", SDP_OFFER.format(port=40000)))
        oks = {}
        while len(oks) < len(calls):
            m = await c.recv(5.0)
            if not m.is_request and m.status == 200:
                oks[m.call_id] = m
        assert set(oks) == {call.call_id for call in calls}
        assert max(sizes) > 1          # several INVITEs per recvmmsg
        for call in calls:
            call.to_tag = oks[call.call_id].to_tag
            c.send(call.request("ACK", cseq=1))
            call.cseq = 2
            c.send(call.request("BYE"))
        byes = set()
        while len(byes) < len(calls):
            m = await c.recv(5.0)
            if not m.is_request and m.status == 200 and m.cseq_method == "BYE":
                byes.add(m.call_id)
        assert byes == set(oks)
        c.close()
