"""`baton call`: a test caller built on PJSIP (pjsua2).

    baton call 2000                               # sip:2000@127.0.0.1:5060
    baton call 2000 --engine 127.0.0.1:5070 --dtmf "1@3s,2@6s" --hangup-after 10
    baton call sip:1001@127.0.0.1:5060 --play hello.wav --record back.wav --hangup-after 5

It dials, prints what happens (ringing, answered, DTMF sent, who hung up,
the duration, the SIP final status) and exits 0 when the call was answered,
1 when it was not (the status is named), 2 on bad arguments.

PJSIP is driven from the calling thread only (threadCnt = 0, mainThreadOnly,
RTP on the SIP ioqueue, pumped with libHandleEvents), so every callback runs
between two Python statements of ours. PJSIP would advertise the host's other
interface by default: SIP and RTP are bound to one address (127.0.0.1 unless
--bind says otherwise) and that address is the published one everywhere, with
every NAT helper (STUN, ICE, TURN, UPnP, Contact/Via rewriting) off.

`Phone` and `CallRun` are the same caller for programs (`baton demo` drives
calls with them); PJSIP allows one Endpoint per process, so use one Phone.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import json
import os
import re
import signal
import socket
import sys
import time
import wave

try:
    import pjsua2 as pj
except ImportError:  # `baton call --help` works without it; a call says what to install
    pj = None

DEFAULT_ENGINE = "127.0.0.1:5060"
DTMF_KEYS = "0123456789*#ABCD"
_LOG_KEEP = 4000        # PJSIP log entries kept in memory (SIP messages among them)
_RX_RESPONSE = re.compile(r"RX \d+ bytes Response msg (\d+)/(\w+)/cseq=")


# -- arguments ------------------------------------------------------------------------
@dataclasses.dataclass
class DtmfStep:
    """Send `digits` (RFC 4733) `at` seconds after the answer."""
    at: float
    digits: str


def _seconds(text: str, what: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s)?\s*", text)
    if not m:
        raise ValueError(f"{what}: {text!r} is not a time (e.g. 3s, 1.5, 500ms)")
    value = float(m.group(1))
    return value / 1000.0 if m.group(2) == "ms" else value


def parse_dtmf(spec: str) -> list[DtmfStep]:
    """`--dtmf` steps: comma-separated `DIGITS[@TIME]` or `DIGITS[+TIME]`.

    `@TIME` is seconds after the answer, `+TIME` seconds after the previous
    step; a step with neither comes one second after the previous one (the
    first: one second after the answer). `1@3s,2@6s`, `1+2s,2+2s`, `123`."""
    steps: list[DtmfStep] = []
    last = 0.0
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        m = re.fullmatch(r"([0-9A-Da-d*#]+)\s*(?:([@+])\s*(.+))?", item)
        if not m:
            raise ValueError(f"--dtmf: bad step {item!r} (digits among {DTMF_KEYS}, "
                             "then @TIME or +TIME, e.g. 1@3s)")
        digits, how, when = m.group(1).upper(), m.group(2), m.group(3)
        if how == "@":
            at = _seconds(when, "--dtmf")
        else:
            at = last + (_seconds(when, "--dtmf") if how == "+" else 1.0)
        if at < last:
            raise ValueError(f"--dtmf: step {item!r} at {at:g}s comes before the previous "
                             f"one at {last:g}s")
        steps.append(DtmfStep(at, digits))
        last = at
    if not steps:
        raise ValueError("--dtmf: no digits")
    return steps


def target_uri(target: str, engine: str = DEFAULT_ENGINE) -> str:
    """A number, `user@host[:port]` or a SIP URI, as the URI to dial."""
    t = target.strip()
    if not t:
        raise ValueError("nothing to call: give a number or a sip: URI")
    if t.lower().startswith(("sip:", "sips:")):
        return t
    if "@" in t:
        return "sip:" + t
    if not re.fullmatch(r"[0-9A-Za-z*#+._-]+", t):
        raise ValueError(f"{target!r} is neither a number nor a SIP URI")
    return f"sip:{t}@{engine}"


def check_wav(path: str) -> float:
    """The length in seconds of a PCM WAV PJSIP can play; ValueError otherwise."""
    try:
        with wave.open(path) as w:
            if w.getsampwidth() != 2:
                raise ValueError(f"--play: {path} is {8 * w.getsampwidth()}-bit; "
                                 "PJSIP plays 16-bit PCM WAV")
            return w.getnframes() / float(w.getframerate())
    except FileNotFoundError:
        raise ValueError(f"--play: no such file {path}") from None
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"--play: {path} is not a PCM WAV file ({exc})") from None


def free_port(host: str = "127.0.0.1", even: bool = False) -> int:
    """A port free for both UDP and TCP on `host`."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((host, 0))
            port = u.getsockname()[1]
            if even and port % 2:
                continue
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                    t.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port on {host}")


class CallerError(Exception):
    """The caller could not start (PJSIP missing, address in use, bad file)."""


# -- PJSIP ------------------------------------------------------------------------------
class _LogWriter(pj.LogWriter if pj else object):
    """PJSIP's log (SIP messages included): the latest entries in memory and,
    with a path, all of them in a file flushed on every entry. Responses that
    arrive after a call has ended (the 200 to our BYE) are seen only here."""

    def __init__(self, path: str | None):
        super().__init__()
        self.entries: collections.deque = collections.deque(maxlen=_LOG_KEEP)
        # (method, status) of every response received, in order, however long the run.
        self.responses: list[tuple[str, int]] = []
        self.file = open(path, "w", errors="replace") if path else None

    def write(self, entry):
        self.entries.append(entry.msg)
        m = _RX_RESPONSE.search(entry.msg)
        if m:
            self.responses.append((m.group(2), int(m.group(1))))
        if self.file is not None:
            try:
                self.file.write(entry.msg if entry.msg.endswith("\n") else entry.msg + "\n")
                self.file.flush()
            except ValueError:
                pass  # file closed: the library's last words at destruction

    def text(self) -> str:
        return "".join(self.entries)


class MediaEndpoint(pj.Endpoint if pj else object):
    """Media on the SIP ioqueue (no media thread), no VAD (silence is sent as
    audio, so the far end's timeline has no holes) and no echo canceller."""

    def libInit(self, cfg):
        med = cfg.medConfig
        med.hasIoqueue = False
        med.threadCnt = 0
        med.noVad = True
        med.ecTailLen = 0
        return super().libInit(cfg)


def loopback_ep_config(max_calls: int, user_agent: str, log_writer, log_level: int = 4):
    """The `pj.EpConfig` of a user agent polled from one thread: UPnP off, the
    bridge at the G.711 rate, and everything up to LOG_LEVEL (at least 4, which
    has the SIP messages) sent to LOG_WRITER, not the terminal. The endpoint
    deletes its writer in libDestroy(), so the writer is handed over here."""
    cfg = pj.EpConfig()
    ua = cfg.uaConfig
    ua.threadCnt = 0
    ua.mainThreadOnly = True
    ua.maxCalls = max_calls
    ua.userAgent = user_agent
    ua.enableUpnp = False
    med = cfg.medConfig
    # The conference bridge, player and recorder at the G.711 rate (default 16 kHz).
    med.clockRate = 8000
    med.sndClockRate = 8000
    log = cfg.logConfig
    log.level = log.consoleLevel = max(log_level, 4)
    log.msgLogging = 1
    log.writer = log_writer.__disown__()
    return cfg


def loopback_transport(ep, kind, host: str, port: int) -> int:
    """Create a SIP transport of KIND bound to and advertising HOST:PORT; its id."""
    tc = pj.TransportConfig()
    tc.port = port
    tc.boundAddress = host
    tc.publicAddress = host
    return ep.transportCreate(kind, tc)


def prefer_g711(ep, tune: bool = False) -> None:
    """G.711 only in offers (every other codec at priority 0), so the offer is
    what the engine answers; with TUNE, also no VAD and PLC on for G.711."""
    for ci in ep.codecEnum2():
        cid = ci.codecId
        g711 = cid.startswith(("PCMU/", "PCMA/"))
        ep.codecSetPriority(cid, 255 if g711 else 0)
        if tune and g711:
            prm = ep.codecGetParam(cid)
            prm.setting.vad = False
            prm.setting.plc = True
            ep.codecSetParam(cid, prm)


def loopback_account_config(id_uri: str, host: str):
    """The `pj.AccountConfig` of a registration-less account at ID_URI with no
    NAT traversal (no STUN, ICE, TURN, outbound, keep-alives or header
    rewriting) and RTP bound to and advertising HOST, from an even free port."""
    acfg = pj.AccountConfig()
    acfg.idUri = id_uri
    acfg.regConfig.registrarUri = ""
    acfg.regConfig.registerOnAdd = False
    nat = acfg.natConfig
    nat.sipStunUse = pj.PJSUA_STUN_USE_DISABLED
    nat.mediaStunUse = pj.PJSUA_STUN_USE_DISABLED
    nat.iceEnabled = False
    nat.turnEnabled = False
    nat.sdpNatRewriteUse = 0
    nat.contactRewriteUse = 0
    nat.viaRewriteUse = 0
    nat.sipOutboundUse = 0
    nat.udpKaIntervalSec = 0
    mtc = acfg.mediaConfig.transportConfig
    mtc.port = free_port(host, even=True)
    mtc.portRange = 40
    mtc.boundAddress = host
    mtc.publicAddress = host
    return acfg


def _guarded(callback):
    """A PJSIP callback that never lets a Python exception unwind into C: the
    exception is kept on the phone and raised again by `Phone.check()`."""
    def wrapper(self, prm):
        try:
            callback(self, prm)
        except BaseException as exc:   # noqa: BLE001 (re-raised on our side)
            if self.phone.callback_error is None:
                self.phone.callback_error = exc
    wrapper.__name__ = callback.__name__
    wrapper.__doc__ = callback.__doc__
    return wrapper



def pump(ep, seconds: float) -> None:
    """Run PJSIP's events on this thread for `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ep.libHandleEvents(10)


def settle(ep, cond, timeout: float) -> bool:
    """Run PJSIP's events until `cond()` holds or `timeout` passes; whether it held."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        ep.libHandleEvents(10)
    return True

class PhoneCall(pj.Call if pj else object):
    """One call and what happened to it; `report` receives progress lines."""

    def __init__(self, phone: "Phone", acc, report=None):
        super().__init__(acc)
        self.phone = phone
        self.report = report or (lambda line: None)
        self.state = pj.PJSIP_INV_STATE_NULL
        self.states: list[str] = []
        self.last_status: int | None = None
        self.last_reason = ""
        self.ringing = False
        self.started = time.monotonic()
        self.answered_at: float | None = None
        self.ended_at: float | None = None
        self.media_active = False
        self.hung_up_by: str | None = None     # "us" or "the far end"
        # (status, reason) of the INVITE's final response.
        self.invite_final: tuple[int, str] | None = None
        self.received_dtmf: list[str] = []
        # RTP counted by PJSIP's stream: the last sample, taken before the stream goes.
        self.media_stats: dict | None = None

    def sample_media(self) -> None:
        """Keep the audio stream's RTP counters (packets each way, loss, jitter)."""
        try:
            rtcp = self.getStreamStat(0).rtcp
        except pj.Error:
            return
        rx, tx = rtcp.rxStat, rtcp.txStat
        self.media_stats = {"rtp_sent": tx.pkt, "rtp_received": rx.pkt, "rtp_lost": rx.loss,
                            "jitter_ms": round(rx.jitterUsec.mean / 1000, 1) if rx.pkt else None}

    # -- callbacks (inside libHandleEvents, in the pumping thread) ----------------
    @_guarded
    def onCallState(self, prm):
        ci = self.getInfo()
        self.state = ci.state
        self.states.append(ci.stateText)
        self.last_status, self.last_reason = ci.lastStatusCode, ci.lastReason
        now = time.monotonic()
        if ci.state == pj.PJSIP_INV_STATE_EARLY and not self.ringing:
            self.ringing = True
            self.report(f"ringing ({ci.lastStatusCode} {ci.lastReason})")
        elif ci.state == pj.PJSIP_INV_STATE_CONFIRMED and self.answered_at is None:
            self.answered_at = now
            self.report(f"answered ({ci.lastStatusCode} {ci.lastReason}) after "
                        f"{now - self.started:.2f} s")
        elif ci.state == pj.PJSIP_INV_STATE_DISCONNECTED:
            self.ended_at = now
            if self.answered_at is not None and self.hung_up_by is None:
                self.hung_up_by = "the far end"

    @_guarded
    def onCallMediaState(self, prm):
        ci = self.getInfo()     # keep it: `media` points into it
        for mi in ci.media:
            if mi.type == pj.PJMEDIA_TYPE_AUDIO:
                self.media_active = mi.status == pj.PJSUA_CALL_MEDIA_ACTIVE

    @_guarded
    def onCallTsxState(self, prm):
        e = prm.e
        if e.type != pj.PJSIP_EVENT_TSX_STATE:
            return
        ts = e.body.tsxState
        tsx = ts.tsx
        if tsx.role == pj.PJSIP_ROLE_UAC and tsx.method == "INVITE" and tsx.statusCode >= 200 \
                and ts.type == pj.PJSIP_EVENT_RX_MSG and self.invite_final is None:
            self.invite_final = (tsx.statusCode, tsx.statusText)

    @_guarded
    def onStreamDestroyed(self, prm):
        self.sample_media()

    @_guarded
    def onDtmfDigit(self, prm):
        self.received_dtmf.append(prm.digit)

    # -- state ------------------------------------------------------------------------
    @property
    def confirmed(self) -> bool:
        return self.state == pj.PJSIP_INV_STATE_CONFIRMED

    @property
    def disconnected(self) -> bool:
        return self.state == pj.PJSIP_INV_STATE_DISCONNECTED

    def elapsed(self) -> float:
        """Seconds since the answer (0 before it)."""
        if self.answered_at is None:
            return 0.0
        return (self.ended_at or time.monotonic()) - self.answered_at

    def final_status(self) -> tuple[int, str]:
        """The INVITE's final status and reason (PJSIP's own when none arrived)."""
        if self.invite_final is not None:
            return self.invite_final
        return int(self.last_status or 0), self.last_reason or ""


def _without_stdout(func) -> None:
    """Run `func` with file descriptor 1 on /dev/null: pjlib prints its banner
    there before any log setting can apply, and stdout carries our progress."""
    import ctypes

    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    saved = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        func()
    finally:
        libc.fflush(None)      # C stdio's buffer goes to /dev/null, not to the real stdout
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


class Phone:
    """One pjsua2 Endpoint: UDP and TCP SIP on one port and RTP, bound to and
    advertised as `bind`; an account without registration whose From is
    `sip:FROM_USER@BIND:PORT`, with digest credentials when given. A context
    manager: leaving it hangs up and calls libDestroy()."""

    def __init__(self, bind: str = "127.0.0.1", from_user: str = "baton-call",
                 user: str | None = None, password: str | None = None,
                 log_file: str | None = None, max_calls: int = 4):
        if pj is None:
            raise CallerError("PJSIP's Python binding is missing: "
                              ".venv/bin/pip install pjsua2-python")
        self.bind = bind
        self.from_user = from_user
        self.user, self.password = user, password
        self.log_file = log_file
        self.max_calls = max_calls
        self.ep = None
        self.acc = None
        self.accounts: dict = {}
        self.sip_port = 0
        self.calls: list[PhoneCall] = []
        self.log: _LogWriter | None = None
        self.callback_error: BaseException | None = None

    account_class = pj.Account if pj else object   # `baton text` takes texts on its own

    def __enter__(self) -> "Phone":
        self.ep = MediaEndpoint()
        _without_stdout(self.ep.libCreate)
        try:
            self._start()
        except pj.Error as exc:
            self._destroy()
            raise CallerError(f"PJSIP could not start: {exc.info()}") from None
        except BaseException:
            self._destroy()
            raise
        return self

    def _start(self) -> None:
        ep = self.ep
        self.log = _LogWriter(self.log_file)
        cfg = loopback_ep_config(self.max_calls, "baton-call", self.log)
        # The null sound device clocks the bridge (players, recorders, DTMF sending): by
        # default it closes when idle for a second and would stay closed for the next call.
        cfg.medConfig.sndAutoCloseTime = -1
        ep.libInit(cfg)

        self.sip_port = free_port(self.bind)
        for kind in (pj.PJSIP_TRANSPORT_UDP, pj.PJSIP_TRANSPORT_TCP):
            loopback_transport(ep, kind, self.bind, self.sip_port)
        ep.libStart()
        ep.audDevManager().setNullDev()     # no sound card: the bridge runs on a null device
        prefer_g711(ep, tune=True)

        self.acc = self.account(self.from_user)

    def account(self, from_user: str):
        """The registration-less account whose From is sip:FROM_USER@BIND:PORT
        (created on first use; each has its own RTP ports)."""
        acc = self.accounts.get(from_user)
        if acc is not None:
            return acc
        acfg = loopback_account_config(f"sip:{from_user}@{self.bind}:{self.sip_port}", self.bind)
        if self.user:
            acfg.sipConfig.authCreds.append(
                pj.AuthCredInfo("digest", "*", self.user, 0, self.password or ""))
        acc = self.account_class()
        acc.create(acfg)
        self.accounts[from_user] = acc
        return acc

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.ep is None:
            return
        try:
            self.ep.hangupAllCalls()
            self.settle(lambda: all(c.state in (pj.PJSIP_INV_STATE_NULL,
                                                pj.PJSIP_INV_STATE_DISCONNECTED)
                                    for c in self.calls), 2.0)
            for acc in self.accounts.values():
                acc.shutdown()
        finally:
            self._destroy()

    def _destroy(self) -> None:
        # A pjsua2 Call deleted after libDestroy() trips an assertion: the library keeps them.
        for c in self.calls:
            c.__disown__()
        self.calls.clear()
        self.acc = None
        self.accounts.clear()
        log, ep = self.log, self.ep
        self.ep = None
        if ep is not None:
            ep.libDestroy()
        if log is not None and log.file is not None:
            log.file.close()

    # -- driving --------------------------------------------------------------------
    def check(self) -> None:
        """Raise, here, what a callback raised inside PJSIP."""
        exc, self.callback_error = self.callback_error, None
        if exc is not None:
            raise exc

    def pump(self, seconds: float) -> None:
        pump(self.ep, seconds)

    def settle(self, cond, timeout: float) -> bool:
        """Pump until `cond()` holds or `timeout` passes; returns whether it held."""
        return settle(self.ep, cond, timeout)

    def call(self, uri: str, report=None, from_user: str | None = None) -> PhoneCall:
        """Dial `uri` (from `from_user`, default the phone's own From)."""
        c = PhoneCall(self, self.account(from_user) if from_user else self.acc, report)
        self.calls.append(c)
        try:
            c.makeCall(uri, pj.CallOpParam(True))
        except pj.Error as exc:
            raise CallerError(f"cannot call {uri}: {exc.reason}") from None
        return c

    def log_text(self) -> str:
        return self.log.text() if self.log is not None else ""

    def rx_responses(self, method: str) -> list[int]:
        """Status codes of the responses to `method` received so far (from the log)."""
        if self.log is None:
            return []
        return [status for meth, status in self.log.responses if meth == method]


# -- one scripted call -------------------------------------------------------------------
@dataclasses.dataclass
class CallResult:
    uri: str
    answered: bool = False
    status: int = 0
    reason: str = ""
    duration: float = 0.0
    hung_up_by: str | None = None
    dtmf_sent: list = dataclasses.field(default_factory=list)
    dtmf_received: str = ""
    played: str | None = None
    recorded: str | None = None
    bye_status: int | None = None
    media: dict | None = None       # rtp_sent, rtp_received, rtp_lost, jitter_ms
    error: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class CallRun:
    """A call placed by `phone` that plays, records, sends DTMF and hangs up as
    told. Drive it with `poll()` in a loop (or `run()` to the end):

        with Phone() as phone:
            result = CallRun(phone, "sip:2000@127.0.0.1:5060", report=print,
                             dtmf=parse_dtmf("1@2s"), hangup_after=5).run()
    """

    def __init__(self, phone: Phone, uri: str, report=None, dtmf=(), play: str | None = None,
                 record: str | None = None, ring_timeout: float = 30.0,
                 hangup_after: float | None = None, from_user: str | None = None):
        self.phone = phone
        self.from_user = from_user or phone.from_user
        self.uri = uri
        self.say = report or (lambda line: None)
        self.dtmf = list(dtmf)
        self.play, self.record = play, record
        self.ring_timeout = ring_timeout
        self.hangup_after = hangup_after
        self.result = CallResult(uri)
        self.call: PhoneCall | None = None
        self._audio = None
        self._player = None
        self._recorder = None
        self._play_length = 0.0
        self._play_done = False
        self._we_hung_up = False
        self._why = ""
        self._byes_before = 0

    def start(self) -> "CallRun":
        if self.play:
            self._play_length = check_wav(self.play)
        self.say(f"calling {self.uri} from sip:{self.from_user}@"
                 f"{self.phone.bind}:{self.phone.sip_port}")
        self.call = self.phone.call(self.uri, self.say, self.from_user)
        return self

    @property
    def ended(self) -> bool:
        return self.call is not None and self.call.disconnected

    def poll(self) -> bool:
        """Pump for a moment and do what is due; False once the call is over."""
        call = self.call
        self.phone.ep.libHandleEvents(10)
        self.phone.check()
        if call.disconnected:
            return False
        if not call.confirmed:
            if time.monotonic() - call.started > self.ring_timeout:
                self.say(f"no answer after {self.ring_timeout:g} s: cancelling")
                self.result.error = f"no answer after {self.ring_timeout:g} s"
                self.hangup("ring timeout")
            return not call.disconnected
        if self._audio is None and call.media_active:
            self._media_up()
        t = call.elapsed()
        while self.dtmf and self.dtmf[0].at <= t:
            self.send_dtmf(self.dtmf.pop(0).digits)
        if self._player is not None and not self._play_done and t >= self._play_length:
            self._play_done = True
            self.say(f"played {os.path.basename(self.play)} to the end")
        if self.hangup_after is not None and t >= self.hangup_after:
            self.hangup(f"--hangup-after {self.hangup_after:g}")
        return True

    def _media_up(self) -> None:
        try:
            self._audio = self.call.getAudioMedia(-1)
        except pj.Error:
            return
        if self.record:
            self._recorder = pj.AudioMediaRecorder()
            self._recorder.createRecorder(self.record)
            self._audio.startTransmit(self._recorder)
            self.say(f"recording what comes back into {self.record}")
        if self.play:
            self._player = pj.AudioMediaPlayer()
            self._player.createPlayer(self.play, pj.PJMEDIA_FILE_NO_LOOP)
            self._player.startTransmit(self._audio)
            self.result.played = self.play
            self.say(f"playing {self.play} ({self._play_length:.1f} s)")

    def send_dtmf(self, digits: str) -> bool:
        """Send `digits` as RFC 4733 events now; False (and a line) if PJSIP refuses."""
        t = self.call.elapsed()
        try:
            self.call.dialDtmf(digits)
        except pj.Error as exc:
            self.say(f"DTMF {digits} not sent: {exc.reason}")
            return False
        self.result.dtmf_sent.append({"digits": digits, "at": round(t, 2)})
        self.say(f"DTMF sent: {digits} (RFC 4733) at {t:.1f} s")
        return True

    def hangup(self, why: str = "") -> None:
        call = self.call
        if call is None or call.disconnected or self._we_hung_up:
            return
        self._we_hung_up = True
        if call.answered_at is not None:
            call.hung_up_by = "us"
        self._why = why
        self._byes_before = len(self.phone.rx_responses("BYE"))
        call.sample_media()
        try:
            call.hangup(pj.CallOpParam(True))
        except pj.Error as exc:
            self.say(f"hang-up failed: {exc.reason}")

    def finish(self) -> CallResult:
        """Wait for the end of the call, release the media and fill in the result."""
        call, res = self.call, self.result
        if call is None:
            return res
        if not call.disconnected:
            self.hangup("finish")
            self.phone.settle(lambda: call.disconnected, 10)
        if call.hung_up_by == "us":
            # PJSIP reports DISCONNECTED when it sends the BYE: the answer is in the log.
            n = self._byes_before
            self.phone.settle(lambda: len(self.phone.rx_responses("BYE")) > n, 3)
            byes = self.phone.rx_responses("BYE")[n:]
            res.bye_status = byes[0] if byes else None
        self._release_media()
        res.status, res.reason = call.final_status()
        res.answered = call.answered_at is not None
        res.duration = round(call.elapsed(), 3)
        res.hung_up_by = call.hung_up_by
        res.dtmf_received = "".join(call.received_dtmf)
        res.media = call.media_stats
        if res.answered:
            who = call.hung_up_by or "?"
            why = f" ({self._why})" if who == "us" and self._why else ""
            bye = (f"; BYE answered {res.bye_status}" if res.bye_status
                   else "; no answer to our BYE" if who == "us" else "")
            self.say(f"hung up by {who}{why} after {res.duration:.1f} s")
            if res.dtmf_received:
                self.say(f"DTMF received: {res.dtmf_received}")
            m = res.media
            if m is not None:
                jitter = f", jitter {m['jitter_ms']:g} ms" if m["jitter_ms"] is not None else ""
                self.say(f"media: {m['rtp_sent']} RTP packets sent, {m['rtp_received']} "
                         f"received, {m['rtp_lost']} lost{jitter}")
            self.say(f"call ended: INVITE {res.status} {res.reason}, duration "
                     f"{res.duration:.1f} s{bye}")
        else:
            res.error = res.error or f"{res.status} {res.reason}".strip()
            self.say(f"call failed: {res.status} {res.reason}".rstrip())
        return res

    def _release_media(self) -> None:
        if self._recorder is not None:
            self.result.recorded = self.record
        # The WAV header gets its sizes when the recorder is destroyed, which
        # must happen while the library is still up.
        self._player = self._recorder = self._audio = None
        gc.collect()

    def run(self) -> CallResult:
        """Place the call and drive it to its end. Ctrl-C (or SIGTERM) hangs up."""
        self.start()
        try:
            while self.poll():
                pass
        except KeyboardInterrupt:
            self.say("interrupted: hanging up")
            self.hangup("interrupted")
        return self.finish()


# -- the command ---------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="baton call",
        description="Place a test call with PJSIP: dial a number or SIP URI, send DTMF "
                    "(RFC 4733), play a WAV file, record what comes back, hang up after N "
                    "seconds or when the far end does. Progress goes to stdout; the exit "
                    "status is 0 when the call was answered, 1 when it was not (the SIP "
                    "status is named), 2 on bad arguments.",
        epilog="examples:\n"
               "  baton call 1001 --play in.wav --record out.wav --hangup-after 5\n"
               "  baton call 2000 --dtmf '1@3s' --hangup-after 10\n"
               "  baton call sip:2000@127.0.0.1:5060 --dtmf '1@2s,2+3s,#'\n"
               "  baton call 1000 --engine 127.0.0.1:5070 --user alice --password secret",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="NUMBER|URI",
                   help="a number on the engine (e.g. 2000), user@host:port, or a sip: URI")
    p.add_argument("--engine", default=DEFAULT_ENGINE, metavar="HOST:PORT",
                   help=f"where numbers are dialled (default {DEFAULT_ENGINE})")
    p.add_argument("--dtmf", metavar="STEPS", type=_steps,
                   help="digits to send as RFC 4733 events: DIGITS@TIME (seconds after the "
                        "answer) or DIGITS+TIME (after the previous step), comma-separated, "
                        "e.g. '1@3s,2@6s' or '1+2s,23+1.5s'; a step without a time comes 1 s "
                        "after the previous one")
    p.add_argument("--play", metavar="WAV", help="play this 16-bit PCM WAV into the call "
                                                 "once, from the answer")
    p.add_argument("--record", metavar="WAV",
                   help="record what comes back (8 kHz 16-bit mono WAV) until the end")
    p.add_argument("--hangup-after", type=float, metavar="SECONDS",
                   help="hang up this long after the answer (default: when the far end "
                        "hangs up, or Ctrl-C)")
    p.add_argument("--ring-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="give up (CANCEL) when not answered within this (default 30)")
    p.add_argument("--user", help="digest username, used when challenged (also the From "
                                  "user unless --from is given)")
    p.add_argument("--password", default=os.environ.get("BATON_CALL_PASSWORD"),
                   help="digest password (default $BATON_CALL_PASSWORD)")
    p.add_argument("--from", dest="from_user", metavar="USER",
                   help="the user part of our From (default: --user, else baton-call)")
    p.add_argument("--bind", default="127.0.0.1", metavar="ADDR",
                   help="the local address for SIP and RTP, also advertised in SIP and "
                        "SDP (default 127.0.0.1)")
    p.add_argument("--log", metavar="FILE", help="write PJSIP's log (with the SIP messages) here")
    p.add_argument("--json", action="store_true",
                   help="also print the outcome as one line `RESULT {json}` at the end")
    return p


def _steps(text: str) -> list[DtmfStep]:
    try:
        return parse_dtmf(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def pjsip_present(command: str) -> bool:
    """Whether pjsua2 is importable; says how to install it when not."""
    if pj is None:
        print(f"{command}: PJSIP's Python binding is missing; install it with "
              "`.venv/bin/pip install pjsua2-python` (make setup does)", file=sys.stderr)
    return pj is not None


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        uri = target_uri(args.target, args.engine)
        if args.play:
            check_wav(args.play)
        if args.record:
            parent = os.path.dirname(os.path.abspath(args.record))
            if not os.path.isdir(parent):
                raise ValueError(f"--record: no such directory {parent}")
        if args.hangup_after is not None and args.hangup_after <= 0:
            raise ValueError("--hangup-after: give a number of seconds above 0")
        socket.inet_aton(args.bind)
    except (ValueError, OSError) as exc:
        p.error(str(exc))
    if not pjsip_present("baton call"):
        return 2

    def say(line: str) -> None:
        print(line, flush=True)

    # SIGTERM hangs up like Ctrl-C does (and so does SIGINT when a shell started us
    # in the background with it ignored).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    result = CallResult(uri)
    code = 1
    try:
        with Phone(bind=args.bind, from_user=args.from_user or args.user or "baton-call",
                   user=args.user, password=args.password, log_file=args.log) as phone:
            run = CallRun(phone, uri, report=say, dtmf=args.dtmf or (), play=args.play,
                          record=args.record, ring_timeout=args.ring_timeout,
                          hangup_after=args.hangup_after)
            result = run.run()
            code = 0 if result.answered else 1
    except (CallerError, OSError) as exc:
        result.error = str(exc)
    except KeyboardInterrupt:
        result.error = "interrupted"
    if code:
        why = f"{result.status} {result.reason}".rstrip() if result.status else result.error
        if result.status and result.error and result.error != why:
            why += f" ({result.error})"
        print(f"baton call: {uri} failed: {why}", file=sys.stderr)
    if args.json:
        print("RESULT " + json.dumps(result.to_dict()), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
