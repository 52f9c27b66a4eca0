"""RTP streams: relay, symmetric latching, continuity across source changes, RFC 4733, echo."""
from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time

import pytest

rtp = pytest.importorskip("ext.rtp", reason="ext.rtp is not built (make build)")

from tests.helpers import SDP_OFFER, Call, UdpClient, engine_config, running_engine  # noqa: E402


def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    return s


def packet(seq, ts, ssrc=0x1234, pt=0, payload=b"\xff" * 160, marker=False):
    return struct.pack("!BBHII", 0x80, (0x80 if marker else 0) | pt, seq & 0xFFFF,
                       ts & 0xFFFFFFFF, ssrc) + payload


def header(data):
    b0, b1, seq, ts, ssrc = struct.unpack("!BBHII", data[:12])
    return {"marker": bool(b1 & 0x80), "pt": b1 & 0x7F, "seq": seq, "ts": ts, "ssrc": ssrc}


def drain(sock):
    out = []
    while True:
        try:
            out.append(sock.recv(2048))
        except BlockingIOError:
            return out


def settle(hub, clock=None, ticks=0):
    time.sleep(0.01)
    hub.poll()
    for _ in range(ticks):
        clock.tick()
        time.sleep(0.002)


@contextlib.asynccontextmanager
async def rtcp_call(interval):
    """A call from a test endpoint with its RTCP socket bound (RTP + 1) to an engine that
    sends RTCP every INTERVAL seconds; yields (media socket, RTCP socket, the engine's RTP
    port, the call's leg) and hangs up with BYE after the body."""
    async with running_engine() as eng:
        eng.media.rtcp_interval = interval
        eng.media._rtcp_handle.cancel()
        eng.media._rtcp_handle = asyncio.get_running_loop().call_later(interval, eng.media._rtcp)
        c = UdpClient("127.0.0.1", eng.sip_port)
        media = udp()
        port = media.getsockname()[1]
        ctrl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            ctrl.bind(("127.0.0.1", port + 1))
        except OSError:
            pytest.skip("RTCP port of the test endpoint is taken")
        ctrl.setblocking(False)
        call = Call(c)
        c.send(call.request("INVITE", SDP_OFFER.format(port=port)))
        ok = await c.expect(200)
        call.to_tag = ok.to_tag
        c.send(call.request("ACK"))
        engine_rtp = int(ok.body.split(b"m=audio ")[1].split()[0])
        yield media, ctrl, engine_rtp, next(iter(eng.sessions.values())).legs[0]
        call.cseq = 2
        c.send(call.request("BYE"))
        await c.expect(200)
        c.close()
        media.close()
        ctrl.close()


def test_relay_rewrites_onto_one_continuous_stream():
    hub = rtp.RtpHub()
    clock = rtp.MediaClock()
    a_sock, b_sock, x, y = udp(), udp(), udp(), udp()
    a, b = rtp.RtpStream(a_sock), rtp.RtpStream(b_sock)
    hub.add(a)
    hub.add(b)
    b.set_remote("127.0.0.1", y.getsockname()[1])
    # Phase 1: b is fed by the media clock (a player of silence).
    ch = rtp.Channel(1, b)
    b.terminate()
    clock.add(ch)
    for _ in range(5):
        clock.tick()
    phase1 = [header(p) for p in drain(y)]
    assert len(phase1) == 5 and len({h["ssrc"] for h in phase1}) == 1
    # Phase 2: relay a -> b; the far end of a sends with its own numbering.
    clock.remove(ch)
    a.relay_to(b)
    for i in range(10):
        x.sendto(packet(50000 + i, 90000 + 160 * i), a_sock.getsockname())
    settle(hub)
    phase2 = [header(p) for p in drain(y)]
    assert len(phase2) == 10
    # Phase 3: back to the clock.
    b.terminate()
    clock.add(ch)
    time.sleep(0.02)
    for _ in range(5):
        clock.tick()
    phase3 = [header(p) for p in drain(y)]
    seen = phase1 + phase2 + phase3
    assert len({h["ssrc"] for h in seen}) == 1, "the far end must see one SSRC"
    seqs = [h["seq"] for h in seen]
    assert all((b_ - a_) & 0xFFFF == 1 for a_, b_ in zip(seqs, seqs[1:])), seqs
    tss = [h["ts"] for h in seen]
    assert all(0 < (b_ - a_) & 0xFFFFFFFF < 8000 * 5 for a_, b_ in zip(tss, tss[1:])), tss
    # A marker bit announces each change of source (RFC 3551 4.1).
    assert phase2[0]["marker"] and not phase2[1]["marker"] and phase3[0]["marker"]
    assert a.stats()["rx_packets"] == 10
    hub.close()


def test_symmetric_rtp_latches_to_the_real_source():
    hub = rtp.RtpHub()
    a_sock, b_sock, x1, x2, x3, y = udp(), udp(), udp(), udp(), udp(), udp()
    a, b = rtp.RtpStream(a_sock), rtp.RtpStream(b_sock)
    hub.add(a)
    hub.add(b)
    a.set_remote("127.0.0.1", x1.getsockname()[1])  # what SDP said
    b.set_remote("127.0.0.1", y.getsockname()[1])
    a.relay_to(b)
    b.relay_to(a)
    x2.sendto(packet(1, 160), a_sock.getsockname())  # the real source (e.g. behind NAT)
    settle(hub)
    assert a.remote_addr == x2.getsockname()
    x3.sendto(packet(2, 320), a_sock.getsockname())  # an intruder after latching
    settle(hub)
    assert a.stats()["rx_foreign"] == 1 and len(drain(y)) == 1
    y.sendto(packet(7, 1000), b_sock.getsockname())  # the other way reaches the latched source
    settle(hub)
    assert len(drain(x2)) == 1 and drain(x1) == []
    x2.sendto(b"\x00" * 8, a_sock.getsockname())  # not RTP
    settle(hub)
    assert a.stats()["rx_invalid"] == 1
    hub.close()


def test_rfc4733_events_end_retransmissions_count_once():
    hub = rtp.RtpHub()
    s_sock, x = udp(), udp()
    s = rtp.RtpStream(s_sock, 0, 101)
    hub.add(s)
    s.terminate()
    dst = s_sock.getsockname()
    ts = 4000
    for i, (dur, end) in enumerate([(160, False), (320, False), (800, True), (800, True), (800, True)]):
        x.sendto(packet(10 + i, ts, pt=101, payload=bytes([5, (0x80 if end else 0) | 10]) +
                        struct.pack("!H", dur)), dst)
    # a second key press: '#', new timestamp
    for i, end in enumerate([False, True, True, True]):
        x.sendto(packet(20 + i, ts + 2000, pt=101, payload=bytes([11, (0x80 if end else 0) | 10]) +
                        struct.pack("!H", 640)), dst)
    settle(hub)
    assert s.take_events() == [("5", 800), ("#", 640)]
    hub.close()


def test_terminated_audio_reaches_the_recorder():
    import numpy as np

    hub = rtp.RtpHub()
    clock = rtp.MediaClock()
    s_sock, x = udp(), udp()
    s = rtp.RtpStream(s_sock)
    hub.add(s)
    ch = rtp.Channel(1, s)
    s.terminate()
    clock.add(ch)
    buf = np.zeros(800, dtype=np.int16)
    ch.recorder = rtp.Recorder(buf)
    ramp = bytes(range(0, 160))  # arbitrary μ-law codes
    for i in range(6):
        x.sendto(packet(i, 160 * i, payload=ramp), s_sock.getsockname())
    settle(hub)
    events = []
    for _ in range(6):
        events += clock.tick() or []
    assert events == [(1, "record-full", 800)]
    from ext.g711_py import ulaw_decode

    expect = np.frombuffer(ulaw_decode(ramp), dtype=np.int16)
    assert (np.asarray(ch.recorder.samples())[:160] == expect).all()
    hub.close()


def test_a_frame_that_comes_after_its_tick_is_a_slip():
    """A tick that finds no frame queued hears silence; when audio follows that gap the
    stream has slipped a frame (`underruns`). More than two frames queued after a tick
    drops one (`trimmed`). A gap that only the end of the stream follows is no slip."""
    hub = rtp.RtpHub()
    clock = rtp.MediaClock()
    s_sock, x = udp(), udp()
    s = rtp.RtpStream(s_sock)
    hub.add(s)
    ch = rtp.Channel(1, s)
    s.terminate()
    clock.add(ch)
    dest = s_sock.getsockname()
    clock.tick()                      # before any packet: not a slip
    x.sendto(packet(0, 0), dest)
    settle(hub, clock, ticks=1)       # frame 0 played on time
    clock.tick()                      # frame 1 is late: silence heard
    assert s.stats()["underruns"] == 0
    x.sendto(packet(1, 160), dest)
    settle(hub, clock, ticks=1)
    assert s.stats()["underruns"] == 1 and s.stats()["trimmed"] == 0
    for i in range(2, 6):             # a burst of four frames
        x.sendto(packet(i, 160 * i), dest)
    settle(hub, clock, ticks=1)
    assert s.stats()["trimmed"] == 1
    for _ in range(4):                # the far end stops: silence, and no more audio
        clock.tick()
    assert s.stats()["underruns"] == 1
    hub.close()


def test_a_jitter_buffer_plays_frames_a_tick_late_without_a_slip():
    """With `playout = 2` a stream queues three frames before it plays the first, so a
    frame that comes one tick late is still played in order: no silence, no slip."""
    import numpy as np

    from ext.g711_py import ulaw_decode

    hub = rtp.RtpHub()
    clock = rtp.MediaClock()
    s_sock, x = udp(), udp()
    s = rtp.RtpStream(s_sock)
    s.playout = 2
    hub.add(s)
    ch = rtp.Channel(1, s)
    s.terminate()
    clock.add(ch)
    buf = np.zeros(160 * 12, dtype=np.int16)
    ch.recorder = rtp.Recorder(buf)
    dest = s_sock.getsockname()
    frames = [bytes([0x80 + i]) * 160 for i in range(8)]    # each frame its own level
    for i in range(3):                     # three ticks, a frame each: the buffer fills
        x.sendto(packet(i, 160 * i, payload=frames[i]), dest)
        settle(hub, clock, ticks=1)
    clock.tick()                           # frame 3 is a tick late: frame 1 plays
    for i in (3, 4):
        x.sendto(packet(i, 160 * i, payload=frames[i]), dest)
    settle(hub, clock, ticks=2)
    heard = np.asarray(ch.recorder.samples())
    levels = [int(heard[k * 160]) for k in range(6)]
    decoded = [int(np.frombuffer(ulaw_decode(f[:1]), dtype=np.int16)[0]) for f in frames]
    assert levels == [0, 0, decoded[0], decoded[1], decoded[2], decoded[3]], levels
    assert s.stats()["underruns"] == 0 and s.stats()["trimmed"] == 0
    hub.close()


def test_player_loops_and_reports_done():
    import numpy as np

    hub = rtp.RtpHub()
    clock = rtp.MediaClock()
    s_sock, y = udp(), udp()
    s = rtp.RtpStream(s_sock)
    hub.add(s)
    s.set_remote("127.0.0.1", y.getsockname()[1])
    ch = rtp.Channel(7, s)
    s.terminate()
    clock.add(ch)
    pcm = (np.arange(240) * 100).astype(np.int16)  # 1.5 frames
    ch.play(rtp.Player(pcm, 2))
    events = []
    for _ in range(4):
        events += clock.tick() or []
    assert events == [(7, "play-done", None)]
    got = drain(y)
    assert len(got) == 4  # 3 frames of the player (480 samples), then silence
    hub.close()


async def test_echo_number_returns_what_it_hears():
    raw = engine_config()
    raw["accounts"]["demo"]["numbers"]["1001"] = {"module": "baton.echo"}
    async with running_engine(raw) as eng:
        c = UdpClient("127.0.0.1", eng.sip_port)
        media = udp()
        call = Call(c, "1001")
        c.send(call.request("INVITE", SDP_OFFER.format(port=media.getsockname()[1])))
        ok = await c.expect(200)
        call.to_tag = ok.to_tag
        c.send(call.request("ACK"))
        port = int(ok.body.split(b"m=audio ")[1].split()[0])
        # Avoid μ-law 0x7F (-0): decoding then encoding maps it to 0xFF.
        payloads = [bytes([((i * 7 + j) % 256) if (i * 7 + j) % 256 != 0x7F else 0x7E
                           for j in range(160)]) for i in range(25)]
        for i, p in enumerate(payloads):
            media.sendto(packet(100 + i, 160 * i, payload=p), ("127.0.0.1", port))
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        back = [d[12:] for d in drain(media)]
        hits = sum(1 for p in payloads if p in back)
        assert hits >= 20, f"only {hits} of 25 frames came back"
        call.cseq = 2
        c.send(call.request("BYE"))
        await c.expect(200)
        c.close()
        media.close()


async def test_rtp_inactivity_ends_the_call_with_bye():
    raw = engine_config()
    raw["media"]["rtp_timeout"] = 1
    async with running_engine(raw) as eng:
        c = UdpClient("127.0.0.1", eng.sip_port)
        call = Call(c)
        c.send(call.request("INVITE", SDP_OFFER.format(port=40000)))
        ok = await c.expect(200)
        call.to_tag = ok.to_tag
        c.send(call.request("ACK"))
        session = next(iter(eng.sessions.values()))
        t0 = time.monotonic()
        while True:
            m = await c.recv(timeout=4)
            if m.is_request:
                break
        assert m.method == "BYE" and 0.8 < time.monotonic() - t0 < 3.5
        assert session.end_reason == "rtp-timeout"
        c.close()


def test_conference_on_the_media_clock_mixes_minus_self():
    import numpy as np

    from ext.g711_py import ulaw_encode
    from ext import mix

    hub = rtp.RtpHub()
    clock = rtp.MediaClock()
    conf = mix.Conference(8)
    socks, farends, chans = [], [], []
    for i in range(3):
        s_sock, far = udp(), udp()
        s = rtp.RtpStream(s_sock)
        hub.add(s)
        s.set_remote("127.0.0.1", far.getsockname()[1])
        ch = rtp.Channel(i + 1, s)
        s.terminate()
        clock.add(ch)
        clock.join(ch, conf, conf.add(i, "pcm"))
        socks.append(s_sock)
        farends.append(far)
        chans.append(ch)
    tone = (8000 * np.sin(2 * np.pi * 1000 * np.arange(160) / 8000)).astype(np.int16)
    payload = ulaw_encode(tone)
    for k in range(3):
        farends[0].sendto(packet(k, 160 * k, payload=payload), socks[0].getsockname())
    settle(hub)
    for _ in range(3):
        clock.tick()
    from ext.g711_py import ulaw_decode

    def energy(far):
        frames = [np.frombuffer(ulaw_decode(p[12:]), dtype=np.int16) for p in drain(far)]
        return max(float(np.abs(f.astype(np.int32)).mean()) for f in frames)

    assert energy(farends[0]) < 50, "a talker must not hear itself"
    assert energy(farends[1]) > 3000 and energy(farends[2]) > 3000
    clock.leave(chans[2])
    assert chans[2].source == rtp.SOURCE_SILENCE
    hub.close()


def test_states_are_named_enums_and_refuse_other_values():
    """Modes, laws and channel sources are IntEnums (ext/rtp.pxd); Python never sees
    or sets a bare int that names nothing."""
    assert [m.name for m in rtp.Mode] == ["IDLE", "RELAY", "TERMINATE"]
    assert [s.name for s in rtp.Source] == ["SILENCE", "PLAYER", "ECHO", "NONE", "MIXER"]
    assert rtp.SOURCE_ECHO is rtp.Source.ECHO and rtp.MODE_RELAY is rtp.Mode.RELAY
    a, b = udp(), udp()
    s, peer = rtp.RtpStream(a, payload_type=8), rtp.RtpStream(b)
    assert s.mode is rtp.Mode.IDLE and s.law is rtp.Law.ALAW
    s.relay_to(peer)
    assert s.mode is rtp.Mode.RELAY
    s.terminate()
    assert s.mode is rtp.Mode.TERMINATE
    s.law = rtp.LAW_ULAW
    assert s.law is rtp.Law.ULAW
    ch = rtp.Channel(1, s)
    assert ch.source is rtp.Source.SILENCE
    ch.echo()
    assert ch.source is rtp.Source.ECHO
    ch.source = rtp.Source.NONE
    assert ch.source is rtp.Source.NONE
    with pytest.raises(ValueError):
        ch.source = 7
    with pytest.raises(ValueError):
        s.law = 2
    assert ch.source is rtp.Source.NONE and s.law is rtp.Law.ULAW
    a.close()
    b.close()


@pytest.mark.parametrize("send_thread", [False, True], ids=["tick", "sender"])
def test_inband_dtmf_detected_on_the_clock(send_thread):
    """Detected on the tick itself, or on the sender thread (then the digit comes with
    the next tick: one tick later, never lost or doubled)."""
    import numpy as np

    from ext.g711_py import ulaw_encode

    hub = rtp.RtpHub()
    clock = rtp.MediaClock(send_thread=send_thread)
    s_sock, x = udp(), udp()
    s = rtp.RtpStream(s_sock)
    hub.add(s)
    ch = rtp.Channel(3, s)
    s.terminate()
    clock.add(ch)
    ch.detect_dtmf(True)
    t = np.arange(160 * 5) / 8000
    digit7 = (6000 * (np.sin(2 * np.pi * 852 * t) + np.sin(2 * np.pi * 1209 * t))).astype(np.int16)
    audio = np.concatenate([digit7, np.zeros(160 * 5, dtype=np.int16)])
    events = []
    at = []
    for k in range(10):
        x.sendto(packet(k, 160 * k, payload=ulaw_encode(audio[160 * k:160 * (k + 1)])),
                 s_sock.getsockname())
        settle(hub)
        got = [e for e in clock.tick() or [] if e[1] == "dtmf"]
        events += got
        at += [k] * len(got)
    events += [e for e in clock.tick() or [] if e[1] == "dtmf"]
    assert events == [(3, "dtmf", "7")]
    tick_of_digit = at[0] if at else 10
    assert tick_of_digit == (2 if send_thread else 1), at
    # Switching detection off waits for the sender: the detector is never freed under it.
    ch.detect_dtmf(False)
    assert not ch.detecting
    clock.close()
    hub.close()


def test_rtcp_sender_report_round_trip():
    from engine.media import rtcp

    stats = {"ssrc": 0x11223344, "ts": 123456, "tx_packets": 500, "tx_bytes": 86000,
             "expected": 400, "lost": 4, "jitter_ms": 2.5, "ext_seq": 70000}
    pkt = rtcp.sender_report(stats, 0x55667788, None)
    assert len(pkt) == 52 and pkt[1] == rtcp.SR and pkt[0] & 0x1F == 1
    report = rtcp.parse(pkt)
    assert report["reports"] == [{"ssrc": 0x55667788, "fraction_lost": 2 / 256.0,
                                  "cumulative_lost": 4, "jitter": 20}]
    assert report["sr_ntp_mid"] is not None
    # A compound RR + SDES, truncated garbage: no exception, partial result.
    rr = bytes([0x81, 201, 0, 7]) + b"\x00" * 4 + pkt[28:52] + bytes([0x81, 202, 0, 1]) + b"\0" * 4
    assert rtcp.parse(rr)["reports"][0]["ssrc"] == 0x55667788
    assert rtcp.parse(b"\x80\xc8\x00\x40short") == {"reports": [], "sr_ntp_mid": None}


async def test_engine_sends_sender_reports_and_reads_receiver_reports():
    from engine.media import rtcp

    async with rtcp_call(0.2) as (media, ctrl, engine_rtp, leg):
        for i in range(20):
            media.sendto(packet(i, 160 * i), ("127.0.0.1", engine_rtp))
            await asyncio.sleep(0.02)
        got = drain(ctrl)
        assert got, "no RTCP sender report arrived"
        sr = got[-1]
        assert sr[1] == rtcp.SR
        assert struct.unpack("!I", sr[4:8])[0] == leg.stream.tx_ssrc
        # Our receiver report reaches the leg's stats.
        rr = bytes([0x81, 201, 0, 7]) + struct.pack("!I", 0xABCDEF) + struct.pack(
            "!IB3sIIII", leg.stream.tx_ssrc, 64, (7).to_bytes(3, "big"), 100, 40, 0, 0)
        ctrl.sendto(rr, ("127.0.0.1", engine_rtp + 1))
        await asyncio.sleep(0.5)
        stats = leg.media_stats()
        assert stats["remote_cumulative_lost"] == 7 and stats["remote_fraction_lost"] == 0.25


def test_jitter_from_kernel_receive_stamps_ignores_a_late_reader():
    """The same packets, sent with RTP timestamps of their real send times, reach three
    sockets and are read in one late batch. Timed by the reader they seem to arrive at
    once (the jitter climbs towards their 10 ms spacing); timed by the kernel's receive
    stamps the stream's jitter is the RFC 3550 jitter of those stamps, which the test
    works out itself from a third socket's (recvmsg, SO_TIMESTAMPNS)."""
    so_timestampns = 35          # Linux (asm-generic and x86): SO_TIMESTAMPNS = SCM_TIMESTAMPNS
    hub = rtp.RtpHub()
    socks, ref, x = (udp(), udp()), udp(), udp()
    ref.setsockopt(socket.SOL_SOCKET, so_timestampns, 1)
    read_time, stamped = (rtp.RtpStream(s) for s in socks)
    assert stamped.use_kernel_timestamps() and stamped.kernel_ts and not read_time.kernel_ts
    for s in (read_time, stamped):
        hub.add(s)
        s.terminate()
    t0 = time.monotonic()
    for i in range(40):
        p = packet(i, int((time.monotonic() - t0) * 8000))   # the sender's own clock
        for s in (*socks, ref):
            x.sendto(p, s.getsockname())
        time.sleep(0.01)
    time.sleep(0.05)
    hub.poll()
    jitter, prev = 0.0, None
    for _ in range(40):
        data, anc, _flags, _addr = ref.recvmsg(2048, 64)
        (stamp,) = [struct.unpack("qq", d[:16]) for lvl, typ, d in anc
                    if lvl == socket.SOL_SOCKET and typ == so_timestampns]
        transit = (stamp[0] * 1_000_000_000 + stamp[1]) // 125000 - header(data)["ts"]
        if prev is not None:
            jitter += (abs(transit - prev) - jitter) / 16
        prev = transit
    a, b = read_time.stats(), stamped.stats()
    assert a["rx_packets"] == b["rx_packets"] == 40
    assert b["jitter_ms"] == pytest.approx(jitter / 8, abs=0.2), (b, jitter / 8)
    assert a["jitter_ms"] > 6.0 and a["jitter_ms"] > b["jitter_ms"] + 3.0, (a, b)



def _clock_run(send_thread: bool, ticks: int = 12):
    """Three channels (player, echo, silence) run `ticks` ticks; what each far end got,
    the streams' counters and the clock's own."""
    import numpy as np

    hub = rtp.RtpHub()
    clock = rtp.MediaClock(send_thread=send_thread)
    assert clock.send_thread is send_thread
    far, streams, chans = [], [], []
    for i in range(3):
        s_sock, y = udp(), udp()
        s = rtp.RtpStream(s_sock)
        hub.add(s)
        s.set_remote("127.0.0.1", y.getsockname()[1])
        ch = rtp.Channel(i + 1, s)
        s.terminate()
        clock.add(ch)
        far.append(y)
        streams.append((s, s_sock))
        chans.append(ch)
    pcm = (np.sin(np.arange(800) / 3) * 8000).astype(np.int16)   # 5 frames
    chans[0].play(rtp.Player(pcm, 1))
    chans[1].echo()
    for i in range(ticks):            # the echo hears nothing: it sends silence
        if i == 6:
            chans[2].mute_output()      # the far end holds the call: nothing sent
        events = clock.tick()
        assert events in (None, [(1, "play-done", None)])
    clock.sync()
    got = []
    for y in far:
        packets = drain_all(y)
        first = header(packets[0])["seq"]
        got.append([((header(p)["seq"] - first) & 0xFFFF, p[1], p[12:]) for p in packets])
    counters = [(s.tx_packets, s.tx_bytes) for s, _ in streams]
    # Removing a channel waits for its frame in flight: then its socket may close.
    for ch in chans:
        clock.remove(ch)
    for s, sock in streams:
        hub.remove(s)
        sock.close()
    clock.close()
    assert not clock.send_thread
    hub.close()
    return got, counters, clock.frames_sent, clock.ticks


def drain_all(sock):
    time.sleep(0.005)
    return drain(sock)


def test_media_clock_sender_thread_sends_what_the_tick_sends_itself():
    inline = _clock_run(False)
    threaded = _clock_run(True)
    got, counters, frames, ticks = threaded
    assert ticks == 12
    assert [len(g) for g in got] == [12, 12, 6]   # the muted channel stopped after 6
    assert [seq for seq, _, _ in got[0]] == list(range(12))
    assert len({payload for _, _, payload in got[0][:5]}) == 5     # the player's 5 frames
    assert counters == [(12, 12 * 172), (12, 12 * 172), (6, 6 * 172)]
    assert frames == 30
    # Same octets (payload, marker and payload type), same sequence steps as without the thread.
    assert threaded == inline


def test_media_clock_sender_thread_keeps_the_tick_grid_under_the_engine():
    """The engine's clock sends from the sender thread; a removed channel's frames are
    counted before its stream's figures are retired."""
    import asyncio as _asyncio

    from engine.media.engine import MediaEngine

    loop = _asyncio.new_event_loop()
    try:
        media = MediaEngine(loop)
        assert media.clock.send_thread and media.clock.send_thread_min > 1
        media.clock.send_thread_min = 0      # this one channel's frames go by the thread too
        s_sock, y = udp(), udp()
        s = media.stream(s_sock)
        s.set_remote("127.0.0.1", y.getsockname()[1])
        ch = media.channel(s, owner=None)
        media.start()
        loop.run_until_complete(_asyncio.sleep(0.25))
        media.drop_channel(ch)
        media.release(s)
        sent = media.retired["tx_packets"]
        assert sent >= 5 and sent == media.clock.frames_sent == len(drain_all(y))
        assert media.clock.send_batches == media.clock.ticks
        media.stop()
        assert not media.clock.send_thread
        s_sock.close()
    finally:
        loop.close()


async def test_a_call_without_media_holds_no_rtcp_socket_until_rtp_arrives():
    """One descriptor per held call: the RTCP port (RTP + 1) is bound only once the far
    end's RTP has arrived, and then sender reports go out from it."""
    from engine.media import rtcp

    async with rtcp_call(0.1) as (media, ctrl, engine_rtp, leg):
        await asyncio.sleep(0.5)                 # five RTCP rounds without media
        assert leg.ports.rtcp is None and not drain(ctrl)
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind(("127.0.0.1", engine_rtp + 1))   # the port is not held meanwhile
        probe.close()
        for i in range(15):
            media.sendto(packet(i, 160 * i), ("127.0.0.1", engine_rtp))
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        assert leg.ports.rtcp is not None
        assert leg.ports.rtcp.getsockname()[1] == engine_rtp + 1
        got = drain(ctrl)
        assert got and got[-1][1] == rtcp.SR
