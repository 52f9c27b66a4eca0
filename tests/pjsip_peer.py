"""A PJSIP (pjsua2) user agent for interoperability tests, on loopback only.

PJSIP allows one Endpoint per process and does not always clean up after a
failed call, so tests run each scenario in a child process:

    python tests/pjsip_peer.py SCENARIO --engine 127.0.0.1:5060 [--log FILE]

prints one line `RESULT {json}` and exits 0 when the scenario ran to its
end (the test judges the result) or 1 with an `error` key when it could not.

`PjsipPeer` can also be used directly, once per process:

    with PjsipPeer() as peer:
        call = peer.call("sip:1000@127.0.0.1:5060")
        peer.wait_for(lambda: call.confirmed, 5, "call confirmed")

Everything runs in the calling thread: no PJSIP worker threads
(threadCnt = 0, mainThreadOnly = True), callbacks fire inside
`libHandleEvents`, which `pump`/`wait_for` call. The host has another
interface whose address PJSIP would advertise by default, so SIP and RTP
are bound to 127.0.0.1 and 127.0.0.1 is the published address everywhere;
NAT helpers (STUN, ICE, TURN, UPnP, Contact/Via rewriting) are off, so
nothing is sent anywhere but the engine.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
import traceback

import pjsua2 as pj

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from engine.cli.call import (  # noqa: E402
    loopback_account_config, loopback_ep_config, loopback_transport, prefer_g711, pump, settle)
from tests.helpers import free_port  # noqa: E402

HOST = "127.0.0.1"
MEDIA_STATUS = {pj.PJSUA_CALL_MEDIA_NONE: "NONE", pj.PJSUA_CALL_MEDIA_ACTIVE: "ACTIVE",
                pj.PJSUA_CALL_MEDIA_LOCAL_HOLD: "LOCAL_HOLD",
                pj.PJSUA_CALL_MEDIA_REMOTE_HOLD: "REMOTE_HOLD",
                pj.PJSUA_CALL_MEDIA_ERROR: "ERROR"}


class _LogWriter(pj.LogWriter):
    """Keeps PJSIP's log (SIP messages included) in memory and in a file.

    PJSIP's own log file is buffered until libDestroy(); this one is flushed
    on every entry, so a test can look at messages while the peer runs. With
    mainThreadOnly, entries logged by other threads are handed over in
    libHandleEvents, so write() always runs in the pumping thread."""

    def __init__(self, path: str):
        super().__init__()
        self.entries: list[str] = []
        self.file = open(path, "w", errors="replace")

    def write(self, entry):
        self.entries.append(entry.msg)
        try:
            self.file.write(entry.msg if entry.msg.endswith("\n") else entry.msg + "\n")
            self.file.flush()
        except ValueError:
            pass  # file closed: the library's last words at destruction

    def text(self) -> str:
        return "".join(self.entries)


class PeerCall(pj.Call):
    """A call that records what happened to it, for assertions afterwards."""

    def __init__(self, peer: "PjsipPeer", acc):
        super().__init__(acc)
        self.peer = peer
        self.states: list[str] = []
        self.state = pj.PJSIP_INV_STATE_NULL
        self.last_status = None
        self.last_reason = ""
        self.media_status: list[int] = []
        # (method, status, raw message) of every response to our requests.
        self.responses: list[tuple[str, int, str]] = []

    # -- callbacks (run inside libHandleEvents) -------------------------------
    def onCallState(self, prm):
        ci = self.getInfo()
        self.state = ci.state
        self.states.append(ci.stateText)
        self.last_status = ci.lastStatusCode
        self.last_reason = ci.lastReason

    def onCallMediaState(self, prm):
        ci = self.getInfo()
        for mi in ci.media:
            if mi.type == pj.PJMEDIA_TYPE_AUDIO:
                self.media_status.append(mi.status)

    def onCallTsxState(self, prm):
        e = prm.e
        if e.type != pj.PJSIP_EVENT_TSX_STATE:
            return
        ts = e.body.tsxState
        tsx = ts.tsx
        if tsx.role != pj.PJSIP_ROLE_UAC or ts.type != pj.PJSIP_EVENT_RX_MSG:
            return
        if tsx.statusCode >= 200:
            self.responses.append((tsx.method, tsx.statusCode, ts.src.rdata.wholeMsg))

    # -- helpers --------------------------------------------------------------
    @property
    def confirmed(self) -> bool:
        return self.state == pj.PJSIP_INV_STATE_CONFIRMED

    @property
    def disconnected(self) -> bool:
        return self.state == pj.PJSIP_INV_STATE_DISCONNECTED

    def audio_status(self):
        return self.media_status[-1] if self.media_status else None

    def audio_status_name(self) -> str | None:
        return MEDIA_STATUS.get(self.audio_status(), self.audio_status())

    def finals(self, method: str) -> list[tuple[int, str]]:
        return [(s, m) for meth, s, m in self.responses if meth == method]


class PjsipPeer:
    """One pjsua2 Endpoint with UDP (and optionally TCP) on 127.0.0.1 and a
    registration-less account. A context manager: leaving it always calls
    libDestroy()."""

    endpoint_class = pj.Endpoint   # subclasses may adjust settings on their way into libInit

    def __init__(self, transports=("udp",), max_calls: int = 4, log_file: str | None = None,
                 log_level: int = 4, user: str = "pjsip"):
        self.transports = tuple(transports)
        self.user = user          # the user part of the account's URI (our From)
        self.max_calls = max_calls
        # Always logged (with SIP messages): the log is how responses that
        # arrive after a call's end, like the 200 to our BYE, are seen.
        if log_file is None:
            fd, log_file = tempfile.mkstemp(prefix="pjsip-", suffix=".log")
            os.close(fd)
        self.log_file = log_file
        self.log_level = log_level
        self.ep: pj.Endpoint | None = None
        self.acc: pj.Account | None = None
        self.sip_port = 0
        self.transport_ids: dict[str, int] = {}
        self.calls: list[PeerCall] = []
        self.log: _LogWriter | None = None

    def __enter__(self) -> "PjsipPeer":
        self.ep = self.endpoint_class()
        self.ep.libCreate()
        try:
            self._start()
        except BaseException:
            self.ep.libDestroy()
            self.ep = None
            raise
        return self

    def _start(self) -> None:
        ep = self.ep
        # Entries up to the log level go to the writer instead of stdout,
        # which carries the RESULT line.
        self.log = _LogWriter(self.log_file)
        cfg = loopback_ep_config(self.max_calls, "pjsua2-interop", self.log, self.log_level)
        med = cfg.medConfig
        med.threadCnt = 0  # media polled from libHandleEvents as well
        med.hasIoqueue = True
        ep.libInit(cfg)

        # One port for every SIP transport, like the engine does.
        self.sip_port = free_port(host=HOST)
        kinds = {"udp": pj.PJSIP_TRANSPORT_UDP, "tcp": pj.PJSIP_TRANSPORT_TCP}
        for name in self.transports:
            self.transport_ids[name] = loopback_transport(ep, kinds[name], HOST, self.sip_port)
        ep.libStart()
        # No sound card on a test host: the conference bridge runs on a null device.
        ep.audDevManager().setNullDev()
        prefer_g711(ep)

        acfg = loopback_account_config(f"sip:{self.user}@{HOST}:{self.sip_port}", HOST)
        self.acc = pj.Account()
        self.acc.create(acfg)

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        ep = self.ep
        if ep is None:
            return
        try:
            ep.hangupAllCalls()
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and any(
                    c.state not in (pj.PJSIP_INV_STATE_NULL, pj.PJSIP_INV_STATE_DISCONNECTED)
                    for c in self.calls):
                ep.libHandleEvents(10)
            if self.acc is not None:
                self.acc.shutdown()
        finally:
            # A pjsua2 Call deleted after libDestroy() trips an assertion, and
            # callers may still hold theirs: let the library own them (they
            # live as long as the process).
            for c in self.calls:
                c.__disown__()
            self.calls.clear()
            self.acc = None
            log = self.log
            ep.libDestroy()
            self.ep = None
            if log is not None:
                log.file.close()

    # -- driving ----------------------------------------------------------------
    def pump(self, seconds: float) -> None:
        pump(self.ep, seconds)

    def settle(self, cond, timeout: float) -> bool:
        """Pump until `cond()` holds or `timeout` passes; returns whether it held."""
        return settle(self.ep, cond, timeout)

    def wait_for(self, cond, timeout: float, what: str) -> None:
        if not settle(self.ep, cond, timeout):
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")

    def log_text(self) -> str:
        return self.log.text() if self.log is not None else ""

    def rx_responses(self, method: str) -> list[int]:
        """Status codes of the responses to `method` received so far (from the log)."""
        pat = re.compile(r"RX \d+ bytes Response msg (\d+)/" + re.escape(method) + r"/cseq=")
        return [int(m.group(1)) for m in pat.finditer(self.log_text())]

    def addresses(self) -> list[str]:
        """Every IPv4 address in the log: in SIP messages, SDP and socket reports."""
        return sorted(set(re.findall(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d.])",
                                     self.log_text())))

    def sent_over(self) -> list[str]:
        """The transports (UDP, TCP) and destinations our messages went over."""
        return sorted(set(re.findall(r"TX \d+ bytes \S+ msg \S+ \(\S+\) to (\w+ [\d.:]+):",
                                     self.log_text())))

    def call(self, uri: str) -> PeerCall:
        c = PeerCall(self, self.acc)
        self.calls.append(c)
        c.makeCall(uri, pj.CallOpParam(True))
        return c


# -- scenarios: each returns a JSON-able dict ----------------------------------
def _sdp_of(msg: str) -> str:
    head, sep, body = msg.partition("\r\n\r\n")
    return body if sep else ""


def _stream(call: PeerCall) -> dict:
    si = call.getStreamInfo(0)
    return {"codec": si.codecName, "clock_rate": si.codecClockRate,
            "remote_rtp": si.remoteRtpAddress}


def _hangup(peer: PjsipPeer, call: PeerCall, out: dict) -> None:
    call.hangup(pj.CallOpParam(True))
    peer.wait_for(lambda: call.disconnected, 10, "DISCONNECTED after hangup")
    # PJSIP reports DISCONNECTED as soon as the BYE is sent: the engine's
    # answer to it only shows in the message log.
    peer.settle(lambda: peer.rx_responses("BYE"), 5)  # none: the test reports it
    out["bye_responses"] = peer.rx_responses("BYE")


def _finish(call: PeerCall, out: dict) -> dict:
    out["states"] = call.states
    out["last_status"] = call.last_status
    out["last_reason"] = call.last_reason
    out["invite_responses"] = [s for s, _ in call.finals("INVITE")]
    return out


def scenario_basic(peer: PjsipPeer, engine: str) -> dict:
    """Call 1000, check the answer, hold, unhold, hang up."""
    out: dict = {}
    call = peer.call(f"sip:1000@{engine}")
    peer.wait_for(lambda: call.confirmed or call.disconnected, 10, "CONFIRMED")
    if not call.confirmed:
        return _finish(call, out)
    peer.wait_for(lambda: call.audio_status() is not None, 5, "media state")
    out["answer_sdp"] = _sdp_of(call.finals("INVITE")[-1][1])
    out["stream"] = _stream(call)
    out["media_after_answer"] = call.audio_status_name()

    n = len(call.finals("INVITE"))
    call.setHold(pj.CallOpParam(True))
    peer.wait_for(lambda: len(call.finals("INVITE")) > n, 10, "answer to the hold re-INVITE")
    peer.settle(lambda: call.audio_status() == pj.PJSUA_CALL_MEDIA_LOCAL_HOLD, 3)
    out["hold_status"] = call.finals("INVITE")[-1][0]
    out["hold_sdp"] = _sdp_of(call.finals("INVITE")[-1][1])
    out["media_after_hold"] = call.audio_status_name()

    n = len(call.finals("INVITE"))
    prm = pj.CallOpParam(True)
    prm.opt.flag = pj.PJSUA_CALL_UNHOLD
    call.reinvite(prm)
    peer.wait_for(lambda: len(call.finals("INVITE")) > n, 10, "answer to the unhold re-INVITE")
    peer.settle(lambda: call.audio_status() == pj.PJSUA_CALL_MEDIA_ACTIVE, 3)
    out["unhold_status"] = call.finals("INVITE")[-1][0]
    out["unhold_sdp"] = _sdp_of(call.finals("INVITE")[-1][1])
    out["media_after_unhold"] = call.audio_status_name()
    # A moment with the call up, so RTP flows in both directions.
    peer.pump(0.5)
    _hangup(peer, call, out)
    return _finish(call, out)


def scenario_notfound(peer: PjsipPeer, engine: str) -> dict:
    call = peer.call(f"sip:9999@{engine}")
    peer.wait_for(lambda: call.disconnected, 10, "DISCONNECTED")
    return _finish(call, {})


def scenario_tcp(peer: PjsipPeer, engine: str) -> dict:
    out: dict = {}
    call = peer.call(f"sip:1000@{engine};transport=tcp")
    peer.wait_for(lambda: call.confirmed or call.disconnected, 10, "CONFIRMED")
    if call.confirmed:
        out["answer_sdp"] = _sdp_of(call.finals("INVITE")[-1][1])
        out["contact"] = call.getInfo().remoteContact
        peer.pump(0.3)
        _hangup(peer, call, out)
    return _finish(call, out)


SCENARIOS = {
    "basic": (scenario_basic, ("udp",)),
    "notfound": (scenario_notfound, ("udp",)),
    "tcp": (scenario_tcp, ("udp", "tcp")),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scenario", choices=sorted(SCENARIOS))
    ap.add_argument("--engine", required=True, help="HOST:PORT of the engine")
    ap.add_argument("--log", help="PJSIP log file (with SIP messages)")
    args = ap.parse_args(argv)
    if not re.fullmatch(r"127\.0\.0\.1:\d+", args.engine):
        ap.error("the engine must be on 127.0.0.1")
    func, transports = SCENARIOS[args.scenario]
    result: dict = {"scenario": args.scenario}
    code = 0
    peer = PjsipPeer(transports, log_file=args.log)
    try:
        with peer:
            result["local_port"] = peer.sip_port
            result.update(func(peer, args.engine))
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
        code = 1
    result["addresses"] = peer.addresses()
    result["sent_over"] = peer.sent_over()
    print("RESULT " + json.dumps(result), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
