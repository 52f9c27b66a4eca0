"""A PJSIP (pjsua2) caller or callee that keys in DTMF (RFC 4733) on a schedule
and records what it hears: the service tests' real endpoint.

    python tests/pjsip_keys.py call --engine 127.0.0.1:5060 --number 2100 \\
        --steps w2.0,1,w1.5,2,w3 [--record heard.wav] [--log FILE]
    python tests/pjsip_keys.py answer [--steps ...] [--record heard.wav] --max 20

`--steps` says what to do, in order: `wSECONDS` waits, anything else is keys
to send with `Call.dialDtmf`. `call` hangs up after the last step unless
the engine hung up first; `answer` prints `READY PORT` once it listens, answers
the first INVITE, runs the steps and then waits (up to `--max` seconds) for the
engine to hang up. Both print one `RESULT {json}` line, like tests/pjsip_media.py
(whose media endpoint this reuses).
"""
from __future__ import annotations

import argparse
import gc
import os
import re
import sys
import time

import pjsua2 as pj

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests import pjsip_peer  # noqa: E402
from tests.pjsip_media import MediaPeer, _stats, run_scenario  # noqa: E402
from tests.pjsip_peer import PeerCall  # noqa: E402

_PEER: "MediaPeer | None" = None
_Account = pj.Account


class _InCall(PeerCall):
    """A PeerCall for an INVITE we received (pj.Call with its call id)."""

    def __init__(self, peer, acc, call_id):
        pj.Call.__init__(self, acc, call_id)
        self.peer = peer
        self.states = []
        self.state = pj.PJSIP_INV_STATE_NULL
        self.last_status = None
        self.last_reason = ""
        self.media_status = []
        self.responses = []


class _AnsweringAccount(_Account):
    """The peer's account, answering the first incoming call with 200."""

    incoming: list = []

    def onIncomingCall(self, prm):
        call = _InCall(_PEER, self, prm.callId)
        _PEER.calls.append(call)
        self.incoming.append(call)
        op = pj.CallOpParam(True)
        op.statusCode = 200
        call.answer(op)


def _steps(text: str) -> list:
    out = []
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        out.append(float(part[1:]) if part.startswith("w") else part)
    return out


def _run(peer, call, steps, out) -> None:
    sent = []
    for step in steps:
        if call.disconnected:
            break
        if isinstance(step, float):
            peer.settle(lambda: call.disconnected, step)
        else:
            call.dialDtmf(step)
            sent.append(step)
    out["keys_sent"] = sent


def _record_start(peer, call, path):
    peer.wait_for(lambda: call.audio_status() == pj.PJSUA_CALL_MEDIA_ACTIVE or call.disconnected,
                  5, "active audio")
    if not path or call.disconnected:
        return None
    am = call.getAudioMedia(-1)
    rec = pj.AudioMediaRecorder()
    rec.createRecorder(path)
    am.startTransmit(rec)
    return am, rec


def _record_stop(handle) -> None:
    if handle is None:
        return
    am, rec = handle
    try:
        am.stopTransmit(rec)
    except pj.Error:
        pass  # the call's media is already gone
    # The WAV header gets its sizes when the recorder is destroyed.
    del am, rec, handle
    gc.collect()


def _end(peer, call, out: dict, hang_up: bool) -> dict:
    out["hung_up_by"] = "engine" if call.disconnected else "peer"
    if not call.disconnected and hang_up:
        call.hangup(pj.CallOpParam(True))
        peer.wait_for(lambda: call.disconnected, 10, "DISCONNECTED after hangup")
    out["states"] = call.states
    out["last_status"] = call.last_status
    return out


def scenario_call(peer, args) -> dict:
    call = peer.call(f"sip:{args.number}@{args.engine}")
    peer.wait_for(lambda: call.confirmed or call.disconnected, 10, "CONFIRMED")
    if not call.confirmed:
        raise RuntimeError(f"call to {args.number} not answered: {call.last_status}")
    out: dict = {}
    handle = _record_start(peer, call, args.record)
    t0 = time.monotonic()
    _run(peer, call, _steps(args.steps), out)
    out.update(_stats(call))
    _record_stop(handle)
    out["seconds"] = round(time.monotonic() - t0, 2)
    return _end(peer, call, out, hang_up=True)


def scenario_answer(peer, args) -> dict:
    print(f"READY {peer.sip_port}", flush=True)
    peer.wait_for(lambda: _AnsweringAccount.incoming, args.ring, "an incoming call")
    call = _AnsweringAccount.incoming[0]
    peer.wait_for(lambda: call.confirmed or call.disconnected, 10, "CONFIRMED")
    out: dict = {}
    handle = _record_start(peer, call, args.record)
    t0 = time.monotonic()
    _run(peer, call, _steps(args.steps), out)
    peer.settle(lambda: call.disconnected, max(0.0, args.max - (time.monotonic() - t0)))
    out.update(_stats(call))
    _record_stop(handle)
    out["seconds"] = round(time.monotonic() - t0, 2)
    return _end(peer, call, out, hang_up=True)


SCENARIOS = {"call": scenario_call, "answer": scenario_answer}


def main(argv=None) -> int:
    global _PEER
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scenario", choices=sorted(SCENARIOS))
    ap.add_argument("--engine", default="", help="HOST:PORT of the engine (call)")
    ap.add_argument("--number", default="")
    ap.add_argument("--steps", default="", help="seconds to wait and keys to send, comma-separated")
    ap.add_argument("--record", help="WAV to record what the engine sends into")
    ap.add_argument("--max", type=float, default=20.0, help="answer: seconds to stay on the call")
    ap.add_argument("--ring", type=float, default=30.0, help="answer: seconds to wait for a call")
    ap.add_argument("--log", help="PJSIP log file (with SIP messages)")
    args = ap.parse_args(argv)
    if args.scenario == "call" and not re.fullmatch(r"127\.0\.0\.1:\d+", args.engine):
        ap.error("the engine must be on 127.0.0.1")
    # PjsipPeer creates a plain pj.Account; this process needs one that answers.
    pjsip_peer.pj.Account = _AnsweringAccount
    _PEER = MediaPeer(("udp",), log_file=args.log)
    return run_scenario(_PEER, SCENARIOS[args.scenario], args)


if __name__ == "__main__":
    sys.exit(main())
