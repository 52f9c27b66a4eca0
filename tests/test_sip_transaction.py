"""Transaction state machines and their timers (RFC 3261 17), on a fake clock."""
from __future__ import annotations

import pytest

from ext.sip_py import parse_message
from engine.sip.timers import T1, T2, T4, TimerQueues
from engine.sip.transaction import (ACCEPTED, CALLING, COMPLETED, CONFIRMED, PROCEEDING,
                                    TERMINATED, TRYING, Flow, TransactionLayer, client_key,
                                    server_key)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Wire:
    name = "UDP"

    def __init__(self, reliable=False, clock=None):
        self.reliable = reliable
        self.sent = []
        self.clock = clock

    def send(self, data, addr):
        self.sent.append((self.clock() if self.clock else 0, data))


def setup(reliable=False):
    clock = Clock()
    timers = TimerQueues(clock=clock)
    layer = TransactionLayer(timers)
    wire = Wire(reliable, clock)
    return clock, timers, layer, Flow(wire, ("127.0.0.1", 5060)), wire


def advance(clock, timers, seconds, step=0.01):
    end = clock.now + seconds
    while clock.now < end - 1e-9:
        clock.now = round(clock.now + step, 6)
        timers.run_expired()


def request(method="INVITE", branch="z9hG4bKabc123"):
    return parse_message((
        f"{method} sip:1000@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch={branch}\r\n"
        "From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:1000@127.0.0.1>\r\nCall-ID: c1\r\n"
        f"CSeq: 1 {method}\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n").encode())


def response(status, method="INVITE", branch="z9hG4bKabc123"):
    return parse_message((
        f"SIP/2.0 {status} X\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch={branch}\r\n"
        "From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:1000@127.0.0.1>;tag=2\r\nCall-ID: c1\r\n"
        f"CSeq: 1 {method}\r\nContent-Length: 0\r\n\r\n").encode())


def test_ist_non_2xx_timer_g_doubles_to_t2_then_timer_h():
    clock, timers, layer, flow, wire = setup()
    msg = request()
    st = layer.new_server(server_key(msg), msg, flow)
    timed_out = []
    st.on_timeout = timed_out.append
    st.respond(486, b"486")
    assert st.state == COMPLETED
    advance(clock, timers, 64 * T1 + 0.1)
    times = [round(t - 1000.0, 2) for t, d in wire.sent]
    # first send at 0, then after 0.5, 1, 2, 4, 4, 4 ... seconds (RFC 3261 17.2.1)
    gaps = [round(b - a, 1) for a, b in zip(times, times[1:])]
    assert gaps[:4] == [0.5, 1.0, 2.0, 4.0] and set(gaps[4:]) == {T2}
    assert st.state == TERMINATED and timed_out == [st]
    assert layer.server == {}


def test_ist_ack_confirms_and_timer_i_absorbs():
    clock, timers, layer, flow, wire = setup()
    msg = request()
    st = layer.new_server(server_key(msg), msg, flow)
    st.respond(404, b"404")
    advance(clock, timers, 0.6)
    assert len(wire.sent) == 2
    ack = request("ACK")
    assert server_key(ack) == st.key  # RFC 3261 17.2.3: ACK matches the INVITE
    st.on_request(ack)
    assert st.state == CONFIRMED
    st.on_request(ack)  # absorbed
    advance(clock, timers, T4 + 0.1)
    assert st.state == TERMINATED and len(wire.sent) == 2


def test_ist_retransmitted_invite_resends_last_response():
    clock, timers, layer, flow, wire = setup()
    msg = request()
    st = layer.new_server(server_key(msg), msg, flow)
    st.respond(100, b"100")
    st.on_request(msg)
    assert [d for _, d in wire.sent] == [b"100", b"100"]
    st.respond(200, b"200")
    assert st.state == ACCEPTED
    # Accepted waits out Timer L as a lingering key of the layer, not as an object.
    assert layer.server == {} and st.key in layer.lingering
    assert st.tu is None and st.last is None
    assert layer.absorb(st.key, msg)  # RFC 6026: absorbed in Accepted; the TU retransmits 2xx
    assert len(wire.sent) == 3
    assert layer.counts()["server"] == 1
    advance(clock, timers, 64 * T1 - 0.5)
    assert st.key in layer.lingering
    advance(clock, timers, 0.6)  # Timer L
    assert layer.lingering == {} and layer.counts()["server"] == 0
    assert not layer.absorb(st.key, msg)  # now it would be a new request


def test_nist_timer_j_and_reliable_zero():
    clock, timers, layer, flow, wire = setup()
    msg = request("BYE")
    st = layer.new_server(server_key(msg), msg, flow)
    assert st.state == TRYING
    st.on_request(msg)  # nothing to resend yet
    assert wire.sent == []
    st.respond(200, b"200")
    assert st.state == COMPLETED and layer.server == {}
    assert layer.absorb(st.key, msg)  # RFC 3261 17.2.2: the final response again
    assert [d for _, d in wire.sent] == [b"200", b"200"]
    advance(clock, timers, 64 * T1 - 1)
    assert layer.absorb(st.key, msg) and len(wire.sent) == 3
    advance(clock, timers, 1.2)  # Timer J
    assert layer.lingering == {} and layer.linger_flows == {}
    assert not layer.absorb(st.key, msg) and len(wire.sent) == 3
    # Over TCP, Timer J is zero.
    clock, timers, layer, flow, wire = setup(reliable=True)
    st = layer.new_server(server_key(msg), msg, flow)
    st.respond(200, b"200")
    assert st.state == TERMINATED and layer.server == {}


def test_nict_timer_e_and_f():
    clock, timers, layer, flow, wire = setup()
    results = []
    ct = layer.new_client(client_key("z9hG4bKx1", "BYE"), flow, b"BYE", False,
                          lambda ct, m: results.append(m))
    assert ct.state == TRYING
    advance(clock, timers, 64 * T1 + 0.1)
    times = [round(t - 1000.0, 2) for t, _ in wire.sent]
    gaps = [round(b - a, 1) for a, b in zip(times, times[1:])]
    assert gaps[:3] == [0.5, 1.0, 2.0] and set(gaps[3:]) == {T2}
    assert results == [None] and ct.state == TERMINATED  # Timer F: treated as 408


def test_nict_provisional_then_final_timer_k():
    clock, timers, layer, flow, wire = setup()
    results = []
    ct = layer.new_client(client_key("z9hG4bKabc123", "BYE"), flow, b"BYE", False,
                          lambda ct, m: results.append(m.status if m else None))
    ct.on_message(response(100, "BYE"))
    assert ct.state == PROCEEDING
    ct.on_message(response(200, "BYE"))
    assert ct.state == COMPLETED and results == [100, 200]
    ct.on_message(response(200, "BYE"))  # retransmission absorbed
    assert results == [100, 200]
    advance(clock, timers, T4 + 0.1)
    assert ct.state == TERMINATED


def test_ict_timer_a_b_and_ack_for_non_2xx():
    clock, timers, layer, flow, wire = setup()
    results = []
    ct = layer.new_client(client_key("z9hG4bKabc123", "INVITE"), flow, b"INVITE", True,
                          lambda ct, m: results.append(m.status if m else None),
                          make_ack=lambda m: b"ACK")
    assert ct.state == CALLING
    advance(clock, timers, 3.6)
    assert [d for _, d in wire.sent] == [b"INVITE"] * 4  # 0, 0.5, 1.5, 3.5 (Timer A doubles)
    ct.on_message(response(180))
    assert ct.state == PROCEEDING
    advance(clock, timers, 10)
    assert len(wire.sent) == 4  # no retransmissions in Proceeding
    ct.on_message(response(486))
    assert ct.state == COMPLETED and wire.sent[-1][1] == b"ACK"
    ct.on_message(response(486))  # retransmitted final: ACK again
    assert [d for _, d in wire.sent].count(b"ACK") == 2
    assert results == [180, 486]
    advance(clock, timers, 32.1)  # Timer D
    assert ct.state == TERMINATED


def test_ict_timer_b_timeout():
    clock, timers, layer, flow, wire = setup()
    results = []
    layer.new_client(client_key("z9hG4bKq", "INVITE"), flow, b"INVITE", True,
                     lambda ct, m: results.append(m))
    advance(clock, timers, 64 * T1 + 0.1)
    assert results == [None]


def test_ict_2xx_accepted_passes_retransmissions_up():
    clock, timers, layer, flow, wire = setup()
    results = []
    ct = layer.new_client(client_key("z9hG4bKabc123", "INVITE"), flow, b"INVITE", True,
                          lambda ct, m: results.append(m.status))
    ct.on_message(response(200))
    ct.on_message(response(200))
    assert ct.state == ACCEPTED and results == [200, 200]  # RFC 6026 7.2
    advance(clock, timers, 64 * T1 + 0.1)  # Timer M
    assert ct.state == TERMINATED


def test_reliable_transport_never_retransmits():
    clock, timers, layer, flow, wire = setup(reliable=True)
    layer.new_client(client_key("z9hG4bKr", "OPTIONS"), flow, b"OPTIONS", False, lambda c, m: None)
    advance(clock, timers, 10)
    assert len(wire.sent) == 1


@pytest.mark.parametrize("branch,key_prefix", [("z9hG4bKabc123", "z9hG4bKabc123"),
                                                ("z9hG4bK", "2543"), ("390skdjuw", "2543")])
def test_server_key_magic_cookie_or_rfc2543(branch, key_prefix):
    assert server_key(request(branch=branch)).startswith(key_prefix)
