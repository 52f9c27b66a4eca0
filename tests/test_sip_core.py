"""The SIP core over real loopback sockets: UAS behaviour, TCP framing, IPv6, shutdown."""
from __future__ import annotations

import asyncio
import socket

import pytest

from engine.sip import sdp
from engine.sip.digest import authorize
from ext.sip_py import parse_message
from engine.sessions.journal import list_sessions
from tests.helpers import SDP_OFFER, Call, UdpClient, engine_config, running_engine


def offer(port=40000, direction="sendrecv", addr="127.0.0.1"):
    return SDP_OFFER.format(port=port).replace("a=sendrecv", f"a={direction}").replace(
        "c=IN IP4 127.0.0.1", f"c=IN IP4 {addr}")


def client_for(eng, host="127.0.0.1"):
    return UdpClient(host, eng.sip_port)


async def establish(c: UdpClient, number="1000", body=None):
    call = Call(c, number)
    c.send(call.request("INVITE", offer() if body is None else body))
    ok = await c.expect(200)
    call.to_tag = ok.to_tag
    invite_branch = call.branch
    c.send(call.request("ACK", cseq=1))
    call.branch = invite_branch
    return call, ok


async def test_invite_answer_ack_bye():
    async with running_engine() as eng:
        c = client_for(eng)
        call, ok = await establish(c)
        assert ok.to_tag and ok.get("contact")
        assert ok.get("content-type") == "application/sdp"
        answer = sdp.parse(ok.body)
        neg, _ = sdp.negotiate(answer)
        assert neg.codec == "PCMU" and neg.remote_addr == "127.0.0.1"
        assert neg.remote_port % 2 == 0 and neg.dtmf_pt == 101
        assert len(eng.sessions) == 1
        session = next(iter(eng.sessions.values()))
        assert session.module.code == "baton.hold" and session.history[0].reason == "initial"
        call.cseq = 2
        c.send(call.request("BYE"))
        bye_ok = await c.expect(200)
        assert bye_ok.cseq_method == "BYE"
        await asyncio.sleep(0.05)
        assert eng.sessions == {} and eng.ports.in_use == 0
        assert session.end_reason == "hangup"
        c.close()


async def test_retransmitted_invite_is_absorbed():
    async with running_engine() as eng:
        c = client_for(eng)
        call = Call(c)
        data = call.request("INVITE", offer())
        c.send(data)
        first = await c.expect(200)
        c.send(data)  # RFC 3261 17.2.3: same branch -> same transaction
        second = await c.expect(200)
        assert first.to_tag == second.to_tag
        assert len(eng.sessions) == 1
        c.close()


async def test_2xx_is_retransmitted_until_ack():
    async with running_engine() as eng:
        c = client_for(eng)
        call = Call(c)
        c.send(call.request("INVITE", offer()))
        ok = await c.expect(200)
        again = await c.expect(200, timeout=1.5)  # RFC 3261 13.3.1.4, T1 = 500 ms
        assert again.to_tag == ok.to_tag
        call.to_tag = ok.to_tag
        c.send(call.request("ACK"))
        assert await c.silent(1.2)
        c.close()


async def test_cancel_before_answer():
    raw = engine_config()
    raw["accounts"]["demo"]["numbers"]["1005"] = {"module": "baton.hold", "ring_seconds": 10}
    async with running_engine(raw) as eng:
        c = client_for(eng)
        call = Call(c, "1005")
        c.send(call.request("INVITE", offer()))
        ringing = await c.expect(180)
        assert ringing.to_tag
        branch = call.branch
        c.send(call.request("CANCEL", branch=branch, to_tag=False))
        got = {}
        for _ in range(2):
            m = await c.recv()
            got[m.cseq_method] = m.status
        assert got == {"CANCEL": 200, "INVITE": 487}
        call.to_tag = ringing.to_tag
        c.send(call.request("ACK", branch=branch))
        await asyncio.sleep(0.05)
        assert eng.sessions == {} and eng.ports.in_use == 0
        # A CANCEL that matches nothing: 481 (RFC 3261 9.2).
        other = Call(c, "1005")
        c.send(other.request("CANCEL", to_tag=False))
        await c.expect(481)
        c.close()


async def test_reinvite_hold_and_unhold():
    async with running_engine() as eng:
        c = client_for(eng)
        call, ok = await establish(c)
        for cseq, direction, expect in ((2, "sendonly", "recvonly"), (3, "sendrecv", "sendrecv"),
                                        (4, "inactive", "inactive")):
            call.cseq = cseq
            c.send(call.request("INVITE", offer(direction=direction)))
            re = await c.expect(200)
            assert f"a={expect}".encode() in re.body
            assert re.to_tag == ok.to_tag
            c.send(call.request("ACK"))
        # RFC 2543 hold: c=0.0.0.0
        call.cseq = 5
        c.send(call.request("INVITE", offer(addr="0.0.0.0")))
        await c.expect(200)
        c.send(call.request("ACK"))
        leg = next(iter(eng.sessions.values())).legs[0]
        assert leg.negotiated.hold
        call.cseq = 6
        c.send(call.request("BYE"))
        await c.expect(200)
        c.close()


async def test_reinvite_with_unusable_sdp_gets_488_and_call_survives():
    async with running_engine() as eng:
        c = client_for(eng)
        call, _ = await establish(c)
        call.cseq = 2
        video_only = ("v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
                      "m=video 40002 RTP/AVP 31\r\n")
        c.send(call.request("INVITE", video_only))
        await c.expect(488)
        assert len(eng.sessions) == 1
        call.cseq = 3
        c.send(call.request("BYE"))
        await c.expect(200)
        c.close()


async def test_late_offer_invite():
    async with running_engine() as eng:
        c = client_for(eng)
        call = Call(c)
        c.send(call.request("INVITE", ""))
        ok = await c.expect(200)
        assert b"m=audio" in ok.body and b"PCMU" in ok.body  # our offer
        call.to_tag = ok.to_tag
        c.send(call.request("ACK", offer()))
        await asyncio.sleep(0.05)
        leg = next(iter(eng.sessions.values())).legs[0]
        assert leg.dialog.remote_sdp.startswith(b"v=0")
        call.cseq = 2
        c.send(call.request("BYE"))
        await c.expect(200)
        c.close()


@pytest.mark.parametrize("method,extra,uri,status,header", [
    ("OPTIONS", "", None, 200, "allow"),
    ("FOO", "", None, 501, "allow"),
    ("SUBSCRIBE", "Event: presence\r\n", None, 405, "allow"),
    ("OPTIONS", "Require: nothingSupportsThis, foo\r\n", None, 420, "unsupported"),
    ("OPTIONS", "", "mailto:someone@example.com", 416, None),
    ("BYE", "", None, 481, None),
    ("INFO", "", None, 481, None),
], ids=["options", "unknown-method", "known-unimplemented", "require", "scheme", "bye-no-dialog",
        "info-no-dialog"])
async def test_request_validation(method, extra, uri, status, header):
    async with running_engine() as eng:
        c = client_for(eng)
        call = Call(c)
        c.send(call.request(method, extra=extra, uri=uri))
        m = await c.expect(status)
        assert m.call_id == call.call_id and m.cseq_method == method
        if header:
            assert m.get(header), f"{header} missing"
        if status == 420:
            assert m.get_all("unsupported") == ["nothingSupportsThis", "foo"]
        c.close()


async def test_content_checks():
    async with running_engine() as eng:
        c = client_for(eng)
        call = Call(c)
        c.send(call.request("INVITE", "hello", content_type="text/plain"))
        m = await c.expect(415)
        assert m.get("accept") == "application/sdp"
        call = Call(c)
        c.send(call.request("INVITE", offer(), extra="Accept: text/nobodyKnowsThis\r\n"))
        m = await c.expect(406)
        call = Call(c)
        c.send(call.request("INVITE", offer(), extra="Content-Encoding: gzip\r\n"))
        m = await c.expect(415)
        assert m.get("accept-encoding") == "identity"
        assert eng.sessions == {}
        c.close()


async def test_unknown_number_404_and_ack_absorbed():
    async with running_engine() as eng:
        c = client_for(eng)
        call = Call(c, "9999")
        c.send(call.request("INVITE", offer()))
        m = await c.expect(404)
        call.to_tag = m.to_tag
        c.send(call.request("ACK", branch=call.branch))
        assert await c.silent(0.8)  # no retransmitted 404 once ACKed (Timer G stops)
        c.close()


async def test_non_2xx_final_is_retransmitted_until_ack():
    async with running_engine() as eng:
        c = client_for(eng)
        call = Call(c, "9999")
        c.send(call.request("INVITE", offer()))
        await c.expect(404)
        again = await c.expect(404, timeout=1.5)  # Timer G
        call.to_tag = again.to_tag
        c.send(call.request("ACK", branch=call.branch))
        assert await c.silent(1.2)
        c.close()


async def test_version_malformed_and_garbage():
    async with running_engine() as eng:
        c = client_for(eng)
        call = Call(c)
        c.send(call.request("OPTIONS").replace(b" SIP/2.0\r\n", b" SIP/7.0\r\n", 1))
        await c.expect(505)
        call = Call(c)
        c.send(call.request("OPTIONS").replace(b"CSeq: 1 OPTIONS", b"CSeq: 1 INVITE"))
        m = await c.expect(400)
        assert "CSeq" in m.reason
        c.send(b"\x00\x01garbage that is not SIP\r\n\r\n")
        c.send(b"INVITE sip:1000@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1")  # truncated
        assert await c.silent(0.5)
        # The engine is still healthy.
        c.send(Call(c).request("OPTIONS"))
        await c.expect(200)
        c.close()


async def test_max_forwards_zero_where_forwarding(monkeypatch):
    from engine.runtime import server
    from engine.modules.hold import HoldModule

    class Forwarding(HoldModule):
        code = "baton.hold"
        forwards = True

    monkeypatch.setitem(server.BUILTIN_MODULES, "baton.hold", Forwarding)
    async with running_engine() as eng:
        c = client_for(eng)
        call = Call(c)
        c.send(call.request("INVITE", offer()).replace(b"Max-Forwards: 70", b"Max-Forwards: 0"))
        await c.expect(483)
        c.close()


async def test_in_dialog_cseq_must_increase():
    async with running_engine() as eng:
        c = client_for(eng)
        call, _ = await establish(c)
        call.cseq = 1
        c.send(call.request("INFO", extra="Content-Type: application/dtmf-relay\r\n"))
        m = await c.expect(500)
        assert "Order" in m.reason
        call.cseq = 5
        c.send(call.request("INFO"))
        await c.expect(200)
        call.cseq = 6
        c.send(call.request("BYE"))
        await c.expect(200)
        c.close()


async def test_graceful_stop_sends_bye_and_refuses_new_calls():
    async with running_engine() as eng:
        c = client_for(eng)
        call, ok = await establish(c)
        stopping = asyncio.ensure_future(eng.stop(timeout=2.0))
        bye = await c.recv()
        assert bye.is_request and bye.method == "BYE" and bye.call_id == call.call_id
        assert bye.to_tag == call.from_tag and bye.from_tag == ok.to_tag
        # New calls during the drain are refused (the engine is still listening).
        late = Call(c)
        c.send(late.request("INVITE", offer()))
        m = await c.expect(503)
        assert m.get("retry-after")
        # Answer the BYE so the drain completes.
        resp = (f"SIP/2.0 200 OK\r\nVia: {bye.get('via')}\r\nFrom: {bye.get('from')}\r\n"
                f"To: {bye.get('to')}\r\nCall-ID: {bye.call_id}\r\nCSeq: {bye.get('cseq')}\r\n"
                "Content-Length: 0\r\n\r\n").encode()
        c.send(resp)
        await asyncio.wait_for(stopping, 5)
        assert eng.sip.pending_requests() == 0
        c.close()


async def test_registrar_with_digest():
    raw = engine_config()
    raw["registrar"] = {"mode": "auth", "realm": "baton.test"}
    raw["users"] = {"alice": {"password": "wonderland"}}
    async with running_engine(raw) as eng:
        c = client_for(eng)
        call = Call(c, "alice")
        uri = f"sip:127.0.0.1:{eng.sip_port}"
        c.send(call.request("REGISTER", uri=uri, extra="Expires: 600\r\n"))
        ch = await c.expect(401)
        challenges = ch.get_all("www-authenticate")
        assert any("SHA-256" in v for v in challenges) and any("MD5" in v for v in challenges)
        # A wrong password is refused (403, as for an unknown user), not re-challenged.
        for password, status in (("wrong", 403), ("wonderland", 200)):
            call.cseq += 1
            auth = authorize(challenges[0], "REGISTER", uri, "alice", password, nc=call.cseq)
            c.send(call.request("REGISTER", uri=uri,
                                extra=f"Expires: 600\r\nAuthorization: {auth}\r\n"))
            m = await c.expect(status)
        assert m.get("contact").endswith(">;expires=600") or ";expires=" in m.get("contact")
        assert eng.sip.registrar.lookup(f"sip:alice@127.0.0.1")
        c.close()


async def test_open_registrar_still_guards_configured_users():
    raw = engine_config()
    raw["registrar"] = {"mode": "open", "realm": "baton.test"}
    raw["users"] = {"agent1": {"password": "agent1-secret"}, "alice": {"password": "wonderland"}}
    async with running_engine(raw) as eng:
        c = client_for(eng)
        uri = f"sip:127.0.0.1:{eng.sip_port}"
        # Anyone may register an address nobody configured...
        c.send(Call(c, "visitor").request("REGISTER", uri=uri, extra="Expires: 600\r\n"))
        await c.expect(200)
        assert eng.sip.registrar.lookup("sip:visitor@127.0.0.1")
        # ...but agent1's address needs agent1's password: no credentials, forged
        # ones, or another user's right ones do not take it over.
        call = Call(c, "agent1")
        c.send(call.request("REGISTER", uri=uri, extra="Expires: 600\r\n"))
        challenge = (await c.expect(401)).get_all("www-authenticate")[0]
        forged = ('Digest username="agent1", realm="baton.test", nonce="1", '
                  f'uri="{uri}", response="00000000000000000000000000000000"')
        for user, password, header, status in (
                (None, None, forged, 401),
                ("alice", "wonderland", None, 403),
                ("agent1", "guess", None, 403),
                ("agent1", "agent1-secret", None, 200)):
            call.cseq += 1
            auth = header or authorize(challenge, "REGISTER", uri, user, password, nc=call.cseq)
            c.send(call.request("REGISTER", uri=uri,
                                extra=f"Expires: 600\r\nAuthorization: {auth}\r\n"))
            await c.expect(status)
            assert bool(eng.sip.registrar.lookup("sip:agent1@127.0.0.1")) == (status == 200), user
        c.close()


async def test_register_unknown_scheme_gets_challenge():
    async with running_engine() as eng:
        c = client_for(eng)
        call = Call(c, "bob")
        c.send(call.request("REGISTER", uri=f"sip:127.0.0.1:{eng.sip_port}",
                            extra="Authorization: NoOneKnowsThisScheme opaque-data=here\r\n"))
        m = await c.expect(401)
        assert m.get("www-authenticate").startswith("Digest ")
        c.close()


# -- TCP --------------------------------------------------------------------------------
class TcpPeer:
    def __init__(self, host, port):
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(fam, socket.SOCK_STREAM)
        self.sock.connect((host, port))
        self.sock.setblocking(False)
        self.host, self.port = host, port
        self.local_host, self.local_port = self.sock.getsockname()[:2]
        self.buf = b""

    async def recv(self, timeout=2.0):
        from ext.sip_py import frame_length

        loop = asyncio.get_running_loop()
        while True:
            n = frame_length(self.buf) if self.buf else 0
            if n:
                data, self.buf = self.buf[:n], self.buf[n:]
                return parse_message(data, stream=True)
            chunk = await asyncio.wait_for(loop.sock_recv(self.sock, 65535), timeout)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk

    async def expect(self, status, timeout=2.0):
        while True:
            m = await self.recv(timeout)
            if not m.is_request and (m.status >= 200 or status < 200):
                assert m.status == status, f"expected {status}, got {m.status}"
                return m

    def send(self, data):
        self.sock.sendall(data)


async def test_tcp_call_pipelined_and_fragmented():
    async with running_engine() as eng:
        p = TcpPeer("127.0.0.1", eng.sip_port)
        call = Call(p, transport="TCP")
        # Two pipelined requests in one segment.
        o1 = Call(p, transport="TCP").request("OPTIONS")
        o2 = Call(p, transport="TCP").request("OPTIONS")
        p.send(b"\r\n\r\n" + o1 + o2)  # with a CRLF keep-alive first (RFC 5626)
        await p.expect(200)
        await p.expect(200)
        # One INVITE in three fragments.
        inv = call.request("INVITE", offer())
        for part in (inv[:20], inv[20:300], inv[300:]):
            p.send(part)
            await asyncio.sleep(0.02)
        ok = await p.expect(200)
        call.to_tag = ok.to_tag
        assert b"transport=tcp" in ok.get("contact").encode()
        p.send(call.request("ACK"))
        call.cseq = 2
        p.send(call.request("BYE"))
        await p.expect(200)
        # The connection was reused throughout: one connection in the table.
        assert len(eng.sip.tcp[0].connections) == 1
        p.sock.close()


async def test_tcp_bye_from_engine_reuses_connection():
    async with running_engine() as eng:
        p = TcpPeer("127.0.0.1", eng.sip_port)
        call = Call(p, transport="TCP")
        p.send(call.request("INVITE", offer()))
        ok = await p.expect(200)
        call.to_tag = ok.to_tag
        p.send(call.request("ACK"))
        await asyncio.sleep(0.05)
        session = next(iter(eng.sessions.values()))
        session.end("api")
        bye = await p.recv()
        assert bye.method == "BYE" and bye.via_transport == "TCP"
        p.sock.close()


async def test_tcp_framing_error_closes_connection_only():
    async with running_engine() as eng:
        p = TcpPeer("127.0.0.1", eng.sip_port)
        p.send(b"OPTIONS sip:x@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:1\r\n\r\n")
        with pytest.raises((ConnectionError, OSError)):
            await p.recv(2.0)  # no Content-Length on a stream: unframeable, closed
        p.sock.close()
        q = TcpPeer("127.0.0.1", eng.sip_port)
        q.send(Call(q, transport="TCP").request("OPTIONS"))
        await q.expect(200)
        q.sock.close()


async def test_ipv6_call():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    raw = engine_config(sip_addr="[::1]:0")
    raw["media"]["address"] = "::1"
    async with running_engine(raw) as eng:
        c = UdpClient("::1", eng.sip_port)
        v6 = (SDP_OFFER.format(port=40000).replace("IN IP4 127.0.0.1", "IN IP6 ::1"))
        call, ok = await establish(c, body=v6)
        assert b"c=IN IP6 ::1" in ok.body
        assert ok.get("contact").startswith("<sip:baton@[::1]:")
        call.cseq = 2
        c.send(call.request("BYE"))
        await c.expect(200)
        c.close()


async def test_offer_naming_a_host_for_media_gets_488():
    # RFC 8866 allows a domain name in c=; media is never sent to a name the engine
    # would have to resolve, so such an offer is refused and nothing is left behind.
    async with running_engine() as eng:
        c = client_for(eng)
        call = Call(c)
        c.send(call.request("INVITE", offer(addr="media.example.com")))
        await c.expect(488)
        await asyncio.sleep(0.05)
        assert eng.sessions == {} and eng.ports.in_use == 0
        # In a re-INVITE the call goes on with the media it had.
        call, _ = await establish(c)
        call.cseq = 2
        c.send(call.request("INVITE", offer(addr="12750.0.1")))
        await c.expect(488)
        leg = next(iter(eng.sessions.values())).legs[0]
        assert leg.negotiated.remote_addr == "127.0.0.1"
        call.cseq = 3
        c.send(call.request("BYE"))
        await c.expect(200)
        c.close()


async def test_bridge_refuses_an_unusable_offer_before_dialling():
    cfg = engine_config()
    cfg["accounts"]["demo"]["numbers"]["1002"] = {"endpoint": "sip:1000@{self}"}
    async with running_engine(cfg) as eng:
        c = client_for(eng)
        call = Call(c, "1002")
        video_only = ("v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
                      "m=video 40002 RTP/AVP 31\r\n")
        c.send(call.request("INVITE", video_only))
        await c.expect(488)
        await asyncio.sleep(0.2)
        # Nobody was rung: no call to 1000 was ever made, and nothing is left.
        assert eng.stamper.started == 1
        assert eng.sessions == {} and eng.ports.in_use == 0
        c.close()


async def test_header_octets_that_are_not_utf8_are_journaled_mended():
    async with running_engine() as eng:
        c = client_for(eng)
        call = Call(c)
        raw = call.request("INVITE", offer()).replace(b'From: "Test"', b'From: "T\xffst"')
        c.send(raw)
        ok = await c.expect(200)
        call.to_tag = ok.to_tag
        c.send(call.request("ACK", cseq=1))
        session = next(iter(eng.sessions.values()))
        assert session.from_uri.startswith('"T\ufffdst"')
        call.cseq = 2
        c.send(call.request("BYE"))
        await c.expect(200)
        # The journal's writer thread took the row (before, it died on it).
        rows = []
        for _ in range(100):
            eng.store.flush()
            rows = list_sessions(eng.cfg.data_dir, live=False)
            if rows:
                break
            await asyncio.sleep(0.05)
        assert [r["from_uri"][:6] for r in rows] == ['"T\ufffdst"'], rows
        assert eng.store.thread.is_alive()
        c.close()
