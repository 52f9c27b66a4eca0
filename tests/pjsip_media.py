"""PJSIP (pjsua2) media scenarios against the engine, on loopback only.

One scenario per child process, like tests/pjsip_peer.py (whose endpoint
setup this reuses):

    python tests/pjsip_media.py echo --engine 127.0.0.1:5060 --number 1001 \\
        --play in.wav --record out.wav [--log FILE]
    python tests/pjsip_media.py dtmf --engine 127.0.0.1:5060 --number 2000 \\
        --key 1 [--play in.wav --record out.wav] [--log FILE]

prints one line `RESULT {json}` and exits 0 when the scenario ran to its end
(the test judges the result), or 1 with an `error` key when it could not.

`echo` plays a WAV into the call through an AudioMediaPlayer and records
what the far end sends back with an AudioMediaRecorder; `dtmf` waits for
the prompt, sends the key as RFC 4733 events (`Call.dialDtmf`) and can then
do the same play-and-record through whatever the key led to.

Media differs from the signalling-only peer in three ways:
- RTP shares the SIP ioqueue (`hasIoqueue = False`), so it is received in
  `libHandleEvents` like everything else instead of needing a media thread;
- VAD is off, so silence is sent as audio and the far end's timeline (and
  an echo of it) has no holes;
- no echo canceller, which would try to remove exactly what is measured.
The conference bridge is clocked by the null sound device at 8 kHz.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import traceback
import wave

import pjsua2 as pj

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from engine.cli.call import MediaEndpoint, prefer_g711  # noqa: E402
from tests.pjsip_peer import PjsipPeer, PeerCall  # noqa: E402


class MediaPeer(PjsipPeer):
    endpoint_class = MediaEndpoint

    def __enter__(self) -> "MediaPeer":
        super().__enter__()
        prefer_g711(self.ep, tune=True)
        return self


def _wav_seconds(path: str) -> float:
    with wave.open(path) as w:
        return w.getnframes() / float(w.getframerate())


def _stats(call: PeerCall) -> dict:
    out = {}
    try:
        si = call.getStreamInfo(0)
        out["codec"] = si.codecName
        out["remote_rtp"] = si.remoteRtpAddress
        st = call.getStreamStat(0)
        out["rx_packets"] = st.rtcp.rxStat.pkt
        out["tx_packets"] = st.rtcp.txStat.pkt
        out["rx_lost"] = st.rtcp.rxStat.loss
    except pj.Error as exc:
        out["stats_error"] = exc.info()
    return out


def _connect(peer: MediaPeer, call: PeerCall):
    peer.wait_for(lambda: call.audio_status() == pj.PJSUA_CALL_MEDIA_ACTIVE, 5,
                  "active audio")
    return call.getAudioMedia(-1)


def _play_and_record(peer: MediaPeer, call: PeerCall, play: str, record: str,
                     tail: float = 1.0) -> dict:
    """Play `play` into the call once and record what comes back into
    `record`; both are attached on the same conference tick, so the delay
    in the recording is the round trip."""
    am = _connect(peer, call)
    recorder = pj.AudioMediaRecorder()
    recorder.createRecorder(record)
    player = pj.AudioMediaPlayer()
    player.createPlayer(play, pj.PJMEDIA_FILE_NO_LOOP)
    am.startTransmit(recorder)
    player.startTransmit(am)
    peer.pump(_wav_seconds(play) + tail)
    out = _stats(call)
    player.stopTransmit(am)
    am.stopTransmit(recorder)
    # The WAV header gets its sizes when the recorder is destroyed, which
    # must happen while the library is still up.
    del player, recorder, am
    gc.collect()
    return out


def _hangup(peer: MediaPeer, call: PeerCall, out: dict) -> None:
    if not call.disconnected:
        call.hangup(pj.CallOpParam(True))
        peer.wait_for(lambda: call.disconnected, 10, "DISCONNECTED after hangup")
        peer.settle(lambda: peer.rx_responses("BYE"), 5)
    out["bye_responses"] = peer.rx_responses("BYE")
    out["states"] = call.states
    out["last_status"] = call.last_status


def _answered(peer: MediaPeer, engine: str, number: str) -> PeerCall:
    call = peer.call(f"sip:{number}@{engine}")
    peer.wait_for(lambda: call.confirmed or call.disconnected, 10, "CONFIRMED")
    if not call.confirmed:
        raise RuntimeError(f"call to {number} not answered: {call.last_status} "
                           f"{call.last_reason}")
    return call


def scenario_echo(peer: MediaPeer, args) -> dict:
    call = _answered(peer, args.engine, args.number)
    out = _play_and_record(peer, call, args.play, args.record)
    _hangup(peer, call, out)
    return out


def scenario_dtmf(peer: MediaPeer, args) -> dict:
    call = _answered(peer, args.engine, args.number)
    out: dict = {}
    _connect(peer, call)
    # Into the prompt, then the key (RFC 4733, PJSIP's default DTMF method).
    peer.pump(args.before)
    out["before_key"] = _stats(call)
    call.dialDtmf(args.key)
    out["key_sent"] = args.key
    # Time for the menu to take the key and the bridge to connect.
    peer.pump(args.after)
    if args.play and args.record:
        out.update(_play_and_record(peer, call, args.play, args.record))
    else:
        out.update(_stats(call))
    _hangup(peer, call, out)
    return out


SCENARIOS = {"echo": scenario_echo, "dtmf": scenario_dtmf}


def run_scenario(peer: MediaPeer, scenario, args) -> int:
    """Run SCENARIO(peer, args) inside PEER and print the `RESULT {json}`
    line (with the error and its traceback if it failed); the exit code."""
    result: dict = {"scenario": args.scenario}
    code = 0
    try:
        with peer:
            result["local_port"] = peer.sip_port
            result.update(scenario(peer, args))
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
        code = 1
    result["addresses"] = peer.addresses()
    print("RESULT " + json.dumps(result), flush=True)
    return code


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scenario", choices=sorted(SCENARIOS))
    ap.add_argument("--engine", required=True,
                    help="HOST:PORT of the engine, or of a proxy in front of it (Kamailio)")
    ap.add_argument("--number", required=True)
    ap.add_argument("--play", help="8 kHz mono WAV to send")
    ap.add_argument("--record", help="WAV to record what comes back into")
    ap.add_argument("--key", default="1")
    ap.add_argument("--before", type=float, default=1.5, help="seconds before the key")
    ap.add_argument("--after", type=float, default=1.5, help="seconds after the key")
    ap.add_argument("--log", help="PJSIP log file (with SIP messages)")
    args = ap.parse_args(argv)
    if not re.fullmatch(r"127\.\d{1,3}\.\d{1,3}\.\d{1,3}:\d+", args.engine):
        ap.error("the engine (or the proxy in front of it) must be on a 127.x loopback address")
    if args.scenario == "echo" and not (args.play and args.record):
        ap.error("echo needs --play and --record")
    return run_scenario(MediaPeer(("udp",), log_file=args.log), SCENARIOS[args.scenario], args)


if __name__ == "__main__":
    sys.exit(main())
