"""PJSIP (pjsua2) agents and callers for the call-centre tests, on loopback only.

One Endpoint per process (PJSIP allows no more), driven by JSON lines on
stdin; what happens comes back as JSON lines on stdout:

    python tests/call_center_peer.py [--log FILE]

commands (one JSON object a line):
    {"op": "agent", "name": "alice", "password": "...", "registrar": "127.0.0.1:5060",
     "mode": "answer"}            register with digest and take calls ("answer"),
                                  or let them ring ("ignore")
    {"op": "mode", "name": "alice", "mode": "ignore"}
    {"op": "unregister", "name": "alice"}
    {"op": "call", "id": "c1", "uri": "sip:5000@127.0.0.1:5060"}
    {"op": "hangup", "id": "c1"}   (a caller's id, or an agent call's id from `incoming`)
    {"op": "stats", "id": "c1"}
    {"op": "quit"}
events:
    {"ev": "ready"}
    {"ev": "registered", "name": "alice", "code": 200, "expires": 300}
    {"ev": "incoming", "agent": "alice", "id": "alice-1"}
    {"ev": "state", "id": "c1", "state": "CONFIRMED", "status": 200}
    {"ev": "stats", "id": "c1", "rx_packets": 250, "tx_packets": 250}
    {"ev": "error", "error": "..."}
"""
from __future__ import annotations

import argparse
import json
import os
import select
import sys
import traceback

import pjsua2 as pj

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from engine.cli.call import loopback_account_config  # noqa: E402
from tests.pjsip_media import MediaPeer  # noqa: E402

HOST = "127.0.0.1"


def emit(**ev) -> None:
    sys.stdout.write(json.dumps(ev) + "\n")
    sys.stdout.flush()


class TrackedCall(pj.Call):
    def __init__(self, peer: "CenterPeer", acc, cid: str, call_id=pj.PJSUA_INVALID_ID):
        super().__init__(acc, call_id)
        self.peer = peer
        self.cid = cid
        self.state = pj.PJSIP_INV_STATE_NULL

    def onCallState(self, prm):
        ci = self.getInfo()
        self.state = ci.state
        emit(ev="state", id=self.cid, state=ci.stateText, status=ci.lastStatusCode)

    def onCallMediaState(self, prm):
        ci = self.getInfo()
        for i, mi in enumerate(ci.media):
            if mi.type == pj.PJMEDIA_TYPE_AUDIO and mi.status == pj.PJSUA_CALL_MEDIA_ACTIVE:
                # Connected to the null device: RTP flows both ways.
                am = self.getAudioMedia(i)
                self.peer.ep.audDevManager().getCaptureDevMedia().startTransmit(am)


class AgentAccount(pj.Account):
    def __init__(self, peer: "CenterPeer", name: str, mode: str):
        super().__init__()
        self.peer = peer
        self.name = name
        self.mode = mode
        self.count = 0

    def onRegState(self, prm):
        emit(ev="registered", name=self.name, code=prm.code, expires=prm.expiration)

    def onIncomingCall(self, prm):
        self.count += 1
        call = TrackedCall(self.peer, self, f"{self.name}-{self.count}", prm.callId)
        self.peer.tracked[call.cid] = call
        emit(ev="incoming", agent=self.name, id=call.cid)
        op = pj.CallOpParam()
        op.statusCode = 180
        call.answer(op)
        if self.mode == "answer":
            op = pj.CallOpParam()
            op.statusCode = 200
            call.answer(op)


class CenterPeer(MediaPeer):
    def __init__(self, **kw):
        super().__init__(max_calls=24, **kw)
        self.tracked: dict[str, TrackedCall] = {}
        self.agents: dict[str, AgentAccount] = {}

    def add_agent(self, name: str, password: str, registrar: str, mode: str) -> None:
        acfg = loopback_account_config(f"sip:{name}@{HOST}", HOST)
        acfg.regConfig.registrarUri = f"sip:{registrar}"
        acfg.regConfig.registerOnAdd = True
        acfg.regConfig.timeoutSec = 300
        acfg.sipConfig.authCreds.append(pj.AuthCredInfo("digest", "*", name, 0, password))
        acc = AgentAccount(self, name, mode)
        acc.create(acfg)
        self.agents[name] = acc

    def place(self, cid: str, uri: str) -> None:
        call = TrackedCall(self, self.acc, cid)
        self.tracked[cid] = call
        call.makeCall(uri, pj.CallOpParam(True))

    def handle(self, cmd: dict) -> bool:
        op = cmd.get("op")
        if op == "agent":
            self.add_agent(cmd["name"], cmd["password"], cmd["registrar"],
                           cmd.get("mode", "answer"))
        elif op == "mode":
            self.agents[cmd["name"]].mode = cmd["mode"]
        elif op == "unregister":
            self.agents[cmd["name"]].setRegistration(False)
        elif op == "call":
            self.place(cmd["id"], cmd["uri"])
        elif op == "hangup":
            call = self.tracked[cmd["id"]]
            if call.state not in (pj.PJSIP_INV_STATE_NULL, pj.PJSIP_INV_STATE_DISCONNECTED):
                call.hangup(pj.CallOpParam(True))
        elif op == "stats":
            call = self.tracked[cmd["id"]]
            try:
                st = call.getStreamStat(0)
                emit(ev="stats", id=cmd["id"], rx_packets=st.rtcp.rxStat.pkt,
                     tx_packets=st.rtcp.txStat.pkt)
            except pj.Error as exc:
                emit(ev="stats", id=cmd["id"], error=exc.info())
        elif op == "quit":
            return False
        else:
            emit(ev="error", error=f"unknown op {op!r}")
        return True

    def close(self) -> None:
        for c in self.tracked.values():
            c.__disown__()
        self.tracked.clear()
        for a in self.agents.values():
            try:
                a.shutdown()
            except pj.Error:
                pass
        self.agents.clear()
        super().close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--log", default=None)
    args = ap.parse_args(argv)
    try:
        with CenterPeer(log_file=args.log) as peer:
            emit(ev="ready", sip_port=peer.sip_port)
            buf = b""
            fd = sys.stdin.fileno()
            running = True
            while running:
                peer.ep.libHandleEvents(10)
                r, _, _ = select.select([fd], [], [], 0)
                if not r:
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf and running:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        try:
                            running = peer.handle(json.loads(line))
                        except Exception as exc:
                            emit(ev="error", error=f"{type(exc).__name__}: {exc}")
    except Exception as exc:
        emit(ev="error", error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
