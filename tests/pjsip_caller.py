"""A PJSIP (pjsua2) caller driven line by line over stdin, for tests that
must react to what the engine does (prompts, transitions) rather than sleep.

    python tests/pjsip_caller.py --engine 127.0.0.1:5060 --number 7100 \\
        --record heard.wav [--max 60] [--log FILE] [--user FROM_USER]

Calls the number, records everything the far end sends into `--record`
(8 kHz, from the moment the audio is up) and sends silence. Commands on
stdin: `dtmf DIGITS` (RFC 4733, `Call.dialDtmf`), `hangup`. It prints one
`EVENT {json}` line per happening (`confirmed` with the wall-clock time the
recording starts at, `dtmf-sent`, `disconnected`) and a final
`RESULT {json}`; it ends when the call is over or after `--max` seconds.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import select
import sys
import time
import traceback

import pjsua2 as pj

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.pjsip_media import MediaPeer, _stats  # noqa: E402


def emit(kind: str, **detail) -> None:
    print("EVENT " + json.dumps({"event": kind, "wall": time.time(), **detail}), flush=True)


def run(peer: MediaPeer, args) -> dict:
    call = peer.call(f"sip:{args.number}@{args.engine}")
    peer.wait_for(lambda: call.confirmed or call.disconnected, 10, "CONFIRMED")
    if not call.confirmed:
        raise RuntimeError(f"call not answered: {call.last_status} {call.last_reason}")
    peer.wait_for(lambda: call.audio_status() == pj.PJSUA_CALL_MEDIA_ACTIVE, 5, "active audio")
    am = call.getAudioMedia(-1)
    recorder = pj.AudioMediaRecorder()
    recorder.createRecorder(args.record)
    am.startTransmit(recorder)
    emit("confirmed", record_start=time.time())
    out: dict = {}
    deadline = time.monotonic() + args.max
    buf = ""
    while not call.disconnected and time.monotonic() < deadline:
        peer.ep.libHandleEvents(10)
        ready, _, _ = select.select([sys.stdin], [], [], 0)
        if not ready:
            continue
        chunk = os.read(sys.stdin.fileno(), 4096).decode()
        if not chunk:
            continue
        buf += chunk
        while "\n" in buf:
            line, buf = buf.split("\n", 1)
            cmd, _, arg = line.strip().partition(" ")
            if cmd == "dtmf" and arg and call.confirmed:
                call.dialDtmf(arg)
                emit("dtmf-sent", digits=arg)
            elif cmd == "hangup" and not call.disconnected:
                call.hangup(pj.CallOpParam(True))
    out.update(_stats(call))
    out["disconnected"] = call.disconnected
    out["last_status"] = call.last_status
    if call.disconnected:
        emit("disconnected", status=call.last_status)
    try:
        am.stopTransmit(recorder)
    except pj.Error:
        pass
    del recorder, am
    gc.collect()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", required=True)
    ap.add_argument("--number", required=True)
    ap.add_argument("--record", required=True)
    ap.add_argument("--max", type=float, default=60.0)
    ap.add_argument("--log")
    ap.add_argument("--user", default="pjsip", help="the user part of our From URI")
    args = ap.parse_args(argv)
    if not args.engine.startswith("127.0.0.1:"):
        ap.error("the engine must be on 127.0.0.1")
    result: dict = {}
    code = 0
    peer = MediaPeer(("udp",), log_file=args.log, user=args.user)
    try:
        with peer:
            result.update(run(peer, args))
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
        code = 1
    print("RESULT " + json.dumps(result), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
