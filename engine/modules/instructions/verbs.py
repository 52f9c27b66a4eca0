"""The interpreter: one `Runner` per session runs a document verb by verb.

A Runner is the `ctl.state` of the instructions module while it holds a
session. It runs as one asyncio task that awaits media events (`play-done`,
`dtmf`, recording events) pushed by the module's `media_event`, HTTP
fetches and timers; every await is followed by a check of `ctl.active`, and
`revoke` cancels the task, so a runner that lost control never acts again.

A verb handler returns `None` (go on with the next verb), a `Fetch` (load a
new document: an `action`, a `Redirect`) or `STOP` (control left, or the
call is over). `Dial` to a number or SIP URI leaves this module for an
ad-hoc `baton.bridge` node whose outlets lead back here; the document and
position are kept in `session.saved["baton.instructions"]` so the verb
after `Dial` runs without a new fetch when no `action` is given.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
import secrets
import time
import weakref
from urllib.parse import parse_qsl, unquote, urljoin, urlsplit

from engine.media.commands.gather import Gather
from ext.sip_message import valid_text
from engine.modules.base import answer_caller, operator_param
from engine.modules.instructions import conference, queues
from engine.modules.instructions.conference import Rooms
from engine.modules.instructions.fetch import Fetcher, FetchError
from engine.modules.instructions.parser import Document, DocumentError, Verb, parse
from engine.sip.uri import party
from engine.modules.instructions.flow import STOP, Fetch
from engine.modules.instructions.queues import Queues
from engine.media.files import NO_SUCH_FILE, account_roots, confine, find_recording, recording_path

log = logging.getLogger("baton.instructions")

SAVED_KEY = "baton.instructions"
API_VERSION = "2010-04-01"
APOLOGY = "We are sorry, an application error has occurred. Goodbye."
# Module params that configure the module rather than describe the call.
INTERNAL_PARAMS = {"url", "twiml", "method", "fallback_url", "fallback_method", "timeout",
                   "connect_timeout", "trunk", "voice", "sounds_dir"}
MAX_IDLE_DOCUMENTS = 25     # documents in a row with nothing heard: a Redirect loop
_RECORDING_RE = re.compile(r"RE[0-9a-f]{32}")


class Shared:
    """What every instructions module of one engine shares: the HTTP pool,
    named queues and conference rooms, and the engine's recording URL base."""

    def __init__(self, engine):
        self.engine = engine
        self.fetcher = Fetcher(guard=engine.cfg.guard)
        self.queues = Queues()
        self.rooms = Rooms(lambda: engine.media.clock)
        self.documents: dict = {}      # (url, body) -> Document, oldest first


_shared: "weakref.WeakKeyDictionary[object, Shared]" = weakref.WeakKeyDictionary()


def shared_for(engine) -> Shared:
    s = _shared.get(engine)
    if s is None:
        s = _shared[engine] = Shared(engine)
    return s


async def shutdown(engine) -> None:
    """Close the engine's HTTP pool and background requests (call on engine stop)."""
    s = _shared.pop(engine, None)
    if s is not None:
        for room in list(s.rooms.rooms.values()):
            room.end()
        await s.fetcher.close()


def account_settings(engine, account: str) -> tuple[str | None, bool]:
    """(secret, twilio_signature) of an account, read from the raw config."""
    acc = engine.cfg.raw.get("accounts", {}).get(account, {})
    if not isinstance(acc, dict):
        return None, False
    secret = acc.get("secret")
    return (secret if isinstance(secret, str) and secret else None,
            bool(acc.get("twilio_signature", False)))


def message_status(m) -> dict:
    """Twilio's status-callback parameters of a text (`TextMessage`) at its status."""
    return {"MessageSid": m.sid, "SmsSid": m.sid, "MessageStatus": m.status,
            "SmsStatus": m.status, "AccountSid": m.account, "From": m.frm, "To": m.to,
            "ApiVersion": API_VERSION, "SessionSid": m.session,
            "ErrorCode": m.sip_code if m.status in ("failed", "undelivered") else ""}


class Runner:
    """One session's interpreter while the instructions module holds control."""

    def __init__(self, module, ctl):
        self.module = module
        self.ctl = ctl
        self.session = ctl.session
        self.engine = ctl.engine
        self.shared: Shared = module.shared
        self.loop = self.engine.loop
        self.params: dict = {}
        self.task: asyncio.Task | None = None
        self.player = None
        # Bounded: keys pressed while nothing listens must not pile up.
        self.events: collections.deque = collections.deque(maxlen=64)
        self.waiter: asyncio.Future | None = None
        self.recording = None
        self.participant = None
        self.member = None
        self.doc: Document | None = None
        self.pos = 0
        self.idle_documents = 0
        self.heard = False          # something took time since the last fetch
        self.recording_verb: tuple | None = None
        self.extra: dict = {}       # an outlet's params, sent with the next request

    # -- control ------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.ctl.active

    def start(self, resume: dict | None) -> None:
        self.task = self.loop.create_task(self._main(resume))

    async def _main(self, resume: dict | None) -> None:
        try:
            nxt = self._resume(resume) if resume is not None else self._first()
            await self._run(nxt)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("session %s: instructions failed", self.session.id)
            if self.active:
                self.error({"code": 12400, "reason": f"internal error: {type(exc).__name__}: {exc}"})
                await self._give_up()

    def _first(self):
        p = self.ctl.params
        url = p.get("url") or self.module.params.get("url")
        self.params = {k: v for k, v in {**self.module.params, **p}.items()
                       if not k.startswith("_")}
        twiml = p.get("twiml")
        if not url and not twiml:
            self.error({"code": 11100, "reason": "no url to fetch instructions from"})
            return None
        leg = self.ctl.caller
        dialog = leg.dialog
        if dialog is not None and dialog.invite is not None:
            div = dialog.invite.get("diversion")
            if div:
                self.session.params.setdefault("ForwardedFrom", party(valid_text(div)))
        if not leg.answered and dialog is not None:
            dialog.provisional(180)
        if twiml:
            # A document given inline (REST `Twiml=`): run it as if fetched.
            try:
                self.doc, self.pos = parse(str(twiml).encode(), "inline:Twiml"), 0
            except DocumentError as exc:
                self._report(exc, "inline:Twiml")
            return None
        return Fetch(str(url), str(self.params.get("method", "POST")).upper(), {})

    async def _run(self, nxt) -> None:
        """The main loop: fetch, run verbs, until control leaves or the call ends."""
        while self.active:
            if nxt is STOP:
                return
            if nxt is None and self.doc is None:
                await self._give_up()
                return
            if isinstance(nxt, Fetch):
                doc = await self.load(nxt.url, nxt.method, nxt.params or {})
                if not self.active:
                    return
                if doc is None:
                    await self._give_up()
                    return
                self.doc, self.pos = doc, 0
            if self.pos >= len(self.doc.verbs):
                self._end_of_document()
                return
            verb = self.doc.verbs[self.pos]
            self.pos += 1
            nxt = await self.run_verb(verb)

    async def run_verb(self, verb: Verb):
        handler = getattr(self, "verb_" + verb.name.lower())
        return await handler(verb)

    def _end_of_document(self) -> None:
        # A document that runs out ends the call (as in TwiML), unless the app wired `done`.
        if "done" in self.ctl.node.outlets:
            self.ctl.release("done")
        else:
            self.ctl.hangup("completed")

    # -- events -------------------------------------------------------------------
    def error(self, detail: dict) -> None:
        """An error event on the session, and a log line with its reason."""
        d = dict(detail)
        d.setdefault("module", self.ctl.module.code)
        log.warning("session %s: instructions error %s: %s", self.session.id,
                    d.get("code"), d.get("reason"))
        self.engine.notify(self.session, "error", d)

    def note(self, event: str, detail: dict) -> None:
        self.engine.notify(self.session, event, detail)

    def on_media(self, kind: str, detail) -> None:
        """A media clock event on the caller's leg."""
        if self.recording is not None and self.recording.media_event(kind, detail):
            return
        if kind == "play-done":
            if self.participant is not None and self.participant.beep_done():
                return
            if self.player is None:
                return
            self.player = None
        elif kind != "dtmf":
            return
        self._push((kind, detail))

    def _push(self, ev) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(ev)
        else:
            self.events.append(ev)

    async def next_event(self, timeout: float | None):
        """The next media event, or None after `timeout` seconds."""
        if self.events:
            return self.events.popleft()
        fut = self.loop.create_future()
        self.waiter = fut
        h = self.loop.call_later(timeout, _expire, fut) if timeout is not None else None
        try:
            return await fut
        finally:
            self.waiter = None
            if h is not None:
                h.cancel()

    # -- media helpers ------------------------------------------------------------
    def answer(self) -> bool:
        """Answer the caller if not yet, and listen for in-band DTMF when needed."""
        if not self.active:
            return False
        if not answer_caller(self.ctl):
            return False
        leg = self.ctl.caller
        ch = leg.channel
        if ch is not None and leg.negotiated is not None and leg.negotiated.dtmf_pt is None \
                and not ch.detecting:
            ch.detect_dtmf(True)
        return True

    def stop_player(self) -> None:
        ch = self.ctl.caller.channel
        if self.player is not None and ch is not None and ch.player is self.player:
            ch.silence()
        self.player = None

    async def play_pcm(self, pcm, loops: int = 1, interrupt: bool = False) -> str | None:
        """Play PCM to the caller; with `interrupt`, a key stops it and is returned."""
        from ext.kernels import rtp

        ch = self.ctl.caller.open_channel()
        if ch is None or not self.active:
            return None
        self.heard = True
        self.player = rtp.Player(pcm, loops)
        ch.play(self.player)
        while self.active:
            ev = await self.next_event(None)
            kind, detail = ev
            if kind == "play-done":
                return None
            if kind == "dtmf" and interrupt:
                self.stop_player()
                return detail
        return None

    async def pause(self, seconds: float, interrupt: bool = False) -> str | None:
        self.heard = True
        deadline = self.loop.time() + seconds
        while self.active:
            left = deadline - self.loop.time()
            if left <= 0:
                return None
            ev = await self.next_event(left)
            if ev is None:
                return None
            if ev[0] == "dtmf" and interrupt:
                return ev[1]
        return None

    def resolve(self, ref: str) -> str:
        base = self.doc.url if self.doc is not None else ""
        return urljoin(base, ref.strip()) if base else ref.strip()

    # -- requests -----------------------------------------------------------------
    def form(self, extra: dict | None = None) -> dict:
        """Twilio's request parameters, the module's params and the call's parameters."""
        s = self.session
        out: dict = {}
        for k, v in s.params.items():
            if isinstance(v, (str, int, float)) and not isinstance(v, bool) \
                    and k not in ("RecordingPath",):
                out[k] = v
        for k, v in self.params.items():
            if k not in INTERNAL_PARAMS and isinstance(v, (str, int, float, bool)):
                out[k] = v
        frm = party(s.from_uri)
        to = s.number or party(s.to_uri)
        leg = s.legs[0] if s.legs else None
        out.update({
            "CallSid": s.id, "AccountSid": s.account, "From": frm, "To": to,
            "Caller": frm, "Called": to,
            "CallStatus": "in-progress" if leg is not None and leg.answered else "ringing",
            "Direction": "inbound" if s.direction == "inbound" else "outbound-api",
            "ApiVersion": API_VERSION,
            "ForwardedFrom": s.params.get("ForwardedFrom", ""),
            "CallerName": s.params.get("CallerName", ""),
        })
        if extra:
            out.update(extra)
        return out

    def _request_options(self) -> dict:
        secret, twilio = account_settings(self.engine, self.session.account)
        p = self.params
        # A document's parameters may shorten the timeouts, never pass the operator's cap.
        cap = self.engine.cfg.guard.fetch_timeout_max
        return {"secret": secret, "twilio": twilio,
                "timeout": min(float(p.get("timeout", 10)), cap),
                "connect_timeout": min(float(p.get("connect_timeout", 3)), cap)}

    async def fetch_doc(self, url: str, method: str, params: dict) -> Document:
        if urlsplit(url).scheme not in ("http", "https"):
            raise FetchError(f"not an http(s) URL: {url!r}", 11100)
        resp = await self.shared.fetcher.request(url, method, self.form(params),
                                                 **self._request_options())
        self.note("fetch", {"url": url, "method": method, "status": resp.status,
                            "seconds": round(resp.elapsed, 4)})
        key = (url, resp.body)
        cache = self.shared.documents
        doc = cache.get(key)
        if doc is None:
            doc = parse(resp.body, url)
            for w in doc.warnings[:5]:
                log.info("session %s: %s: %s", self.session.id, url, w)
            # Parsed documents are never changed, so calls that get the same bytes share one.
            if len(resp.body) <= 16384:
                cache[key] = doc
                if len(cache) > 512:
                    del cache[next(iter(cache))]
        return doc

    async def load(self, url: str, method: str, params: dict) -> Document | None:
        """The document at `url`; on failure an error event, then the fallback URL."""
        if not self.heard:
            self.idle_documents += 1
        else:
            self.idle_documents = 0
        self.heard = False
        if self.idle_documents > MAX_IDLE_DOCUMENTS:
            err: Exception = DocumentError(f"{MAX_IDLE_DOCUMENTS} documents in a row without "
                                           f"any audio: a Redirect loop", code=11215)
        else:
            if self.extra:
                params = {**self.extra, **params}
                self.extra = {}
            try:
                return await self.fetch_doc(url, method, params)
            except (FetchError, DocumentError) as exc:
                err = exc
        if not self.active:
            return None
        self.report(err, url)
        fb = self.params.get("fallback_url")
        if fb and self.active:
            code = getattr(err, "code", 11200)
            try:
                doc = await self.fetch_doc(str(fb), str(self.params.get("fallback_method",
                                                                        "POST")).upper(),
                                           {**params, "ErrorCode": code, "ErrorUrl": url})
                self.note("fallback", {"url": fb, "error_url": url, "code": code})
                self.idle_documents = 0
                return doc
            except (FetchError, DocumentError) as exc:
                if self.active:
                    self.report(exc, str(fb))
        return None

    def report(self, err: Exception, url: str) -> None:
        if isinstance(err, DocumentError):
            d = err.detail()
        else:
            d = {"code": getattr(err, "code", 11200), "reason": str(err)}
            if getattr(err, "status", None):
                d["status"] = err.status
        d["url"] = url
        self.error(d)

    async def _give_up(self) -> None:
        """No usable document: the node's fallback outlet, else an apology and hang-up."""
        if not self.active:
            return
        if "fallback" in self.ctl.node.outlets:
            self.ctl.release("fallback")
            return
        self.note("fallback", {"default": "apology"})
        if self.answer():
            try:
                from engine.media.commands.prompt import render

                pcm = await render(self.ctl, APOLOGY, None, "en")
                await self.play_pcm(pcm)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.info("session %s: apology not spoken: %s", self.session.id, exc)
        self.ctl.hangup("instructions-error")

    def fire(self, url: str, method: str, params: dict) -> None:
        """A request whose document is ignored (status callbacks, after a hang-up)."""
        if urlsplit(url).scheme not in ("http", "https"):
            return
        self.shared.fetcher.fire(self.shared.fetcher.request(url, method, self.form(params),
                                                             **self._request_options()))

    # -- verbs --------------------------------------------------------------------
    async def verb_message(self, verb: Verb):
        """`<Message>`/`<Sms>`: a text during the call, to the caller unless `to` names
        someone else (who must pass the account's outbound rules). `statusCallback`
        hears its final status; `action` is fetched at once with `SmsSid` and
        `SmsStatus` and its document replaces the rest of this one (Twilio's `<Sms>`)."""
        body = verb.text or " ".join(c.text for c in verb.children if c.name == "Body")
        cb = verb.get("statusCallback")
        on_status = None
        if cb:
            url, method = self.resolve(cb), verb.get("method", "POST")

            def on_status(m, url=url, method=method):
                self.fire(url, method, message_status(m))
        m = self.engine.messaging.send(self.session, body, to=verb.get("to") or None,
                                       frm=verb.get("from") or None, on_status=on_status)
        self.note("message", {"sid": m.sid, "to": m.to, "status": m.status})
        if verb.get("action"):
            status = "invalid" if m.status == "failed" else "sending"
            return Fetch(self.resolve(verb.get("action")), verb.get("method", "POST"),
                         {"SmsSid": m.sid, "MessageSid": m.sid, "SmsStatus": status})
        return None

    verb_sms = verb_message

    async def verb_say(self, verb: Verb, interrupt: bool = False):
        if not self.answer():
            return STOP
        from engine.media.commands.prompt import render

        voice = verb.get("voice") or self.params.get("voice") or "en"
        try:
            pcm = await render(self.ctl, verb.text, None, voice, verb.get("language"))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.error({"code": 13511, "reason": f"<Say> could not be spoken: {exc}",
                        "line": verb.line, "verb": "Say"})
            return None
        if not self.active:
            return STOP
        key = await self.play_pcm(pcm, verb.get("loop", 1), interrupt)
        return key if interrupt else None

    async def verb_play(self, verb: Verb, interrupt: bool = False):
        if not self.answer():
            return STOP
        if verb.get("digits"):
            await self.send_digits(verb.get("digits"))
            if not verb.text:
                return None
        try:
            pcm = await self.audio(verb.text)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            code = exc.code if isinstance(exc, FetchError) else 13227
            self.error({"code": code, "reason": f"<Play> {verb.text[:200]}: {exc}",
                        "line": verb.line, "verb": "Play"})
            return None
        if not self.active:
            return STOP
        key = await self.play_pcm(pcm, verb.get("loop", 1), interrupt)
        return key if interrupt else None

    async def audio(self, ref: str):
        """PCM of a Play target: an http(s) URL (cached), a recording of this engine, or
        a `file:` path inside the engine's sounds or recordings directory."""
        from engine.media.wav import AudioError, load_wav

        url = self.resolve(ref)
        parts = urlsplit(url)
        local = self._local_recording(url)
        if local is not None:
            return await load_wav(local)
        if parts.scheme in ("http", "https"):
            return await self.shared.fetcher.audio_url(url)
        if parts.scheme in ("file", ""):
            # Only the operator's configuration may widen the directories (a document's
            # Redirect parameters never do); outside them and missing are one answer.
            roots = account_roots(self.engine.cfg, self.session.account)
            extra = operator_param(self.ctl, "sounds_dir")
            if extra:
                roots.append(str(extra))
            path = confine(unquote(parts.path), roots)
            if path is None:
                raise AudioError(NO_SUCH_FILE)
            return await load_wav(path)
        raise AudioError(f"cannot play {parts.scheme}: URLs")

    def _local_recording(self, url: str) -> str | None:
        from engine.runtime import http as http_mod

        base = http_mod.http_url(self.engine)
        if not base or not url.startswith(base + "/recordings/"):
            return None
        name = url[len(base) + len("/recordings/"):].removesuffix(".wav")
        if not _RECORDING_RE.fullmatch(name):
            return None
        return find_recording(self.engine.cfg.data_dir, name, self.session.account)

    async def send_digits(self, digits: str) -> None:
        """DTMF to the caller: RFC 4733 events when negotiated, else in-band tones."""
        from engine.media.commands import digits as dtmf_out

        leg = self.ctl.caller
        ch = leg.open_channel()
        if ch is None or leg.stream is None:
            return
        self.heard = True
        if dtmf_out.rfc4733(ch):
            await dtmf_out.send_events(ch, digits, active=lambda: self.active)
        else:
            await self.play_pcm(dtmf_out.tones(digits))

    async def verb_pause(self, verb: Verb, interrupt: bool = False):
        length = verb.get("length", 1)
        if not self.ctl.caller.answered and not interrupt:
            # A Pause before anything else delays the answer, as in TwiML.
            await asyncio.sleep(length)
            return None if self.active else STOP
        key = await self.pause(length, interrupt)
        return key if interrupt else None

    async def verb_gather(self, verb: Verb):
        if not self.answer():
            return STOP
        finish = verb.get("finishOnKey", "#")
        num = verb.get("numDigits")
        timeout = verb.get("timeout", 5)
        barge = verb.get("bargeIn", True)
        # Keys pressed before the Gather started do not count.
        self.events.clear()
        pending = None
        for child in verb.children:
            handler = {"Say": self.verb_say, "Play": self.verb_play,
                       "Pause": self.verb_pause}[child.name]
            got = await handler(child, interrupt=barge)
            if got is STOP or not self.active:
                return STOP
            if isinstance(got, str):
                pending = got
                break

        def timed_out(g: Gather) -> None:
            w = self.waiter
            if w is not None and not w.done():
                w.set_result(("gather", g))

        gather = Gather(self.ctl.later, num_digits=num or 0, finish_on_key=finish or "",
                        timeout=timeout, on_done=timed_out)
        if pending is not None:
            gather.key(pending)
        gather.arm()
        while self.active and not gather.done:
            ev = await self.next_event(None)
            if ev[0] == "dtmf":
                gather.key(ev[1])
        digits, finished = gather.digits, gather.finished_on
        if not self.active:
            return STOP
        self.heard = True
        if not digits and not verb.get("actionOnEmptyResult", False):
            return None
        action = verb.get("action")
        url = self.resolve(action) if action else (self.doc.url if self.doc else "")
        return Fetch(url, verb.get("method", "POST"),
                     {"Digits": digits, "FinishedOnKey": finished})

    async def verb_record(self, verb: Verb):
        from engine.media.recording import Recording

        if not self.answer():
            return STOP
        path = recording_path(self.engine.cfg.data_dir, self.session.account)
        sid = os.path.basename(path)[:-4]
        silence = verb.get("timeout", 5)
        done = self.loop.create_future()

        def finished(result):
            if not done.done():
                done.set_result(result)

        rec = Recording(self.ctl.caller, path, max_length=verb.get("maxLength", 3600),
                        silence=silence, finish_on_key=verb.get("finishOnKey", "1234567890*#"),
                        beep=verb.get("playBeep", True),
                        trim=verb.get("trim", "trim-silence") == "trim-silence",
                        on_done=finished)
        self.recording = rec
        self.recording_verb = (verb, sid, path, self.doc.url if self.doc else "")
        self.heard = True
        self.events.clear()
        rec.start()
        if silence > 0:
            self.ctl.later(0.5, self._quiet_check, rec, silence)
        result = await done
        self.recording = None
        if not self.active:
            return STOP
        if result["duration"] <= 0:
            return None     # nothing recorded: on to the next verb, as in TwiML
        params = self._recorded(verb, sid, result)
        action = verb.get("action")
        url = self.resolve(action) if action else (self.doc.url if self.doc else "")
        return Fetch(url, verb.get("method", "POST"), params)

    def _quiet_check(self, rec, silence: float) -> None:
        # The recorder reports silence only after some sound: a caller who never
        # speaks ends the recording after `timeout` seconds too.
        if rec.finished or self.recording is not rec:
            return
        r = rec.recorder
        if r is not None and not r.heard and rec.started_at is not None \
                and time.monotonic() - rec.started_at >= silence:
            rec.stop("silence")
            return
        if r is None or not r.heard:
            self.ctl.later(0.5, self._quiet_check, rec, silence)

    def _recorded(self, verb: Verb, sid: str, result: dict) -> dict:
        from engine.runtime import http as http_mod

        base = http_mod.http_url(self.engine)
        url = f"{base}/recordings/{sid}" if base else "file://" + result["path"]
        digits = result.get("digits") or ("hangup" if result["reason"] == "hangup" else "")
        params = {"RecordingUrl": url, "RecordingSid": sid,
                  "RecordingDuration": int(round(result["duration"])), "Digits": digits}
        cb = verb.get("recordingStatusCallback")
        if cb:
            self.fire(self.resolve(cb), verb.get("recordingStatusCallbackMethod", "POST"),
                      {**params, "RecordingStatus": "completed", "RecordingChannels": 1,
                       "RecordingSource": "RecordVerb"})
        self.note("recording", {"sid": sid, "url": url, "duration": result["duration"],
                                "reason": result["reason"]})
        return params

    async def verb_hangup(self, verb: Verb):
        self.ctl.hangup("instructions-hangup")
        return STOP

    async def verb_reject(self, verb: Verb):
        leg = self.ctl.caller
        code = 486 if verb.get("reason") == "busy" else 603
        if not leg.answered and leg.dialog is not None:
            leg.dialog.reject(code, why="rejected")
        else:
            self.ctl.hangup("rejected")
        return STOP

    async def verb_leave(self, verb: Verb):
        return None     # only meaningful in a queue's wait document

    async def verb_redirect(self, verb: Verb):
        target = verb.text.strip()
        if target.startswith(("module:", "outlet:")):
            return self._redirect_module(verb, target)
        url = self.resolve(target)
        if urlsplit(url).scheme not in ("http", "https"):
            self.error({"code": 12200, "reason": f"<Redirect> to {target!r}: not an http(s) "
                                                 f"URL or module reference",
                        "line": verb.line, "verb": "Redirect"})
            return None
        return Fetch(url, verb.get("method", "POST"), {})

    def _redirect_module(self, verb: Verb, target: str):
        """`module:CODE?k=v&outlet=NAME&outlet.NAME=TARGET` or `outlet:NAME?k=v`."""
        from engine.sessions.apps import Node

        ref, _, query = target.partition("?")
        kind, _, name = ref.partition(":")
        q = parse_qsl(query, keep_blank_values=True)
        if not name:
            self.error({"code": 12200, "reason": f"<Redirect> {target!r} names nothing",
                        "line": verb.line, "verb": "Redirect"})
            return None
        q = self._strip_operator_params(verb, target, q)
        if kind == "outlet":
            self.ctl.release(name, **dict(q))
            return STOP
        params: dict = {}
        outlets: dict = {}
        back = None
        for k, v in q:
            if k == "outlet":
                for o in v.split(","):
                    if o.strip():
                        back = back or self._return_node("redirect", {})
                        outlets[o.strip()] = back
            elif k.startswith("outlet."):
                outlets[k[7:]] = self._outlet_target(v)
            else:
                params[k] = v
        back = back or self._return_node("redirect", {})
        # Policy denial or a module that is not there brings the session back here.
        outlets.setdefault("denied", back)
        outlets.setdefault("fallback", back)
        node = Node(name=f"module:{name}", module=name, params=params, outlets=outlets,
                    events={}, app=self.ctl.node.app)
        self.ctl.transfer(node, reason="instruction:Redirect")
        return STOP

    def _strip_operator_params(self, verb: Verb, target: str, q: list) -> list:
        """A document may not set the operator's parameters (a trunk, a sounds
        directory, timeouts): they are dropped, with an error event saying so."""
        from engine.sessions.dialing import OPERATOR_PARAMS, operator_params

        dropped = operator_params(dict(q))
        if not dropped:
            return q
        self.error({"code": 12200, "reason": f"<Redirect> {target.partition('?')[0]!r}: "
                                             f"operator-only parameters ignored: "
                                             f"{', '.join(dropped)}",
                    "line": verb.line, "verb": "Redirect"})
        return [(k, v) for k, v in q if k not in OPERATOR_PARAMS]

    def _outlet_target(self, v: str) -> str:
        """An `outlet.NAME=` target: a node of the app, hangup, a module code or a
        SIP URI as they are; anything else is a URL relative to the document."""
        app = self.ctl.node.app
        if v == "hangup" or (app is not None and v in app.nodes) \
                or v.startswith(("module:", "sip:", "sips:", "tel:")) \
                or ("." in v and "/" not in v and ":" not in v):
            return v
        return self.resolve(v)

    def _return_node(self, kind: str, info: dict):
        """Save the document and position; a node that brings control back to them."""
        from engine.sessions.apps import Node

        token = secrets.token_hex(6)
        self.session.saved[SAVED_KEY] = {
            "token": token, "kind": kind, "doc": self.doc, "pos": self.pos,
            "params": self.params, "info": info, "idle": self.idle_documents,
        }
        node = self.ctl.node
        return Node(name=node.name, module=self.ctl.module.code, params={"_resume": token},
                    outlets=node.outlets, events=node.events, app=node.app)

    def _resume(self, resume: dict):
        """Control came back (after a Dial or a module Redirect)."""
        self.doc = resume["doc"]
        self.pos = resume["pos"]
        self.params = resume["params"]
        self.idle_documents = resume.get("idle", 0)
        info = resume["info"]
        reason = self.ctl.span.reason if self.ctl.span is not None else ""
        extra = {k: v for k, v in self.ctl.params.items() if not k.startswith("_")}
        if reason in ("policy-denied", "fallback"):
            self.error({"code": 13227 if resume["kind"] == "dial" else 11100,
                        "reason": f"{resume['kind']}: control could not pass ({reason})"})
        if resume["kind"] != "dial":
            self.extra = extra
            return None
        status = extra.get("DialCallStatus")
        if status is None:
            status = "failed" if reason in ("policy-denied", "fallback") else "completed"
        answered = info.get("answered")
        ended = info.get("ended") or time.monotonic()
        duration = int(round(ended - answered)) if answered else 0
        params = {"DialCallStatus": status, "DialCallDuration": duration,
                  "DialCallSid": info.get("sid", "")}
        self.note("dial", {"status": status, "duration": duration, "to": info.get("to")})
        action = info.get("action")
        if action:
            return Fetch(action, info.get("method", "POST"), params)
        return None

    # -- Dial -----------------------------------------------------------------------
    async def verb_dial(self, verb: Verb):
        nouns = [c for c in verb.children if c.name in ("Number", "Sip", "Conference", "Queue",
                                                         "Client")]
        if verb.text:
            nouns = [Verb("Number", {}, verb.text, verb.line)]
        noun = nouns[0]
        if len(nouns) > 1:
            log.info("session %s: <Dial> with %d nouns dials the first only", self.session.id,
                     len(nouns))
        if verb.get("record") not in (None, "do-not-record", "false"):
            self.error({"code": 13254, "reason": "<Dial record> is not supported; the call "
                                                 "is not recorded", "line": verb.line,
                        "attribute": "record", "verb": "Dial"})
        if noun.name == "Conference":
            return await conference.dial_conference(self, verb, noun)
        if noun.name == "Queue":
            return await queues.dial_queue(self, verb, noun)
        if not verb.get("answerOnBridge", False) and not self.answer():
            return STOP
        to, trunk = self._dial_target(noun)
        if to is None:
            self.error({"code": 13223, "reason": f"<Dial><{noun.name}>{noun.text}: cannot "
                                                 f"be dialled from here", "line": noun.line,
                        "verb": noun.name})
            return self.dial_done(verb, "failed", 0, "")
        if verb.get("hangupOnStar"):
            log.info("session %s: hangupOnStar is not available on a relayed call",
                     self.session.id)
        return self._demote(verb, to, trunk)

    def _dial_target(self, noun: Verb) -> tuple[str | None, str | None]:
        text = noun.text.strip()
        if noun.name == "Sip":
            return (text, None) if text.lower().startswith(("sip:", "sips:")) else (None, None)
        if noun.name == "Client":
            return None, None
        if text.lower().startswith(("sip:", "sips:")):
            return text, None
        number = text[4:] if text.startswith("tel:") else text
        if not re.fullmatch(r"\+?[0-9*#]{1,32}", number):
            return None, None
        if number in self.engine.cfg.numbers:
            # A number of this engine: dial back into ourselves.
            return f"sip:{number}@{{self}}", None
        trunk = self.params.get("trunk")
        if trunk:
            return number, str(trunk)
        return None, None

    def dial_done(self, verb: Verb, status: str, duration: int, sid: str):
        params = {"DialCallStatus": status, "DialCallDuration": duration, "DialCallSid": sid}
        self.note("dial", {"status": status, "duration": duration})
        action = verb.get("action")
        if action:
            return Fetch(self.resolve(action), verb.get("method", "POST"), params)
        return None

    def _demote(self, verb: Verb, to: str, trunk: str | None):
        """Hand the call to an ad-hoc `baton.bridge` node whose every way out comes back."""
        from engine.sessions.apps import Node

        action = verb.get("action")
        info = {"action": self.resolve(action) if action else None,
                "method": verb.get("method", "POST"), "to": to, "answered": None,
                "ended": None, "sid": ""}
        back = self._return_node("dial", info)
        params = {"to": to, "timeout": verb.get("timeout", 30),
                  "time_limit": verb.get("timeLimit", 14400)}
        if trunk:
            params["trunk"] = trunk
        if verb.get("callerId"):
            params["caller_id"] = verb.get("callerId")
        outlets = {o: back for o in ("busy", "no-answer", "failed", "done", "fallback",
                                     "denied")}
        events = {e: back for e in ("dialled-hangup", "time-limit")}
        node = Node(name="instructions:Dial", module="baton.bridge", params=params,
                    outlets=outlets, events=events, app=self.ctl.node.app)
        session = self.session
        self.ctl.transfer(node, reason="instruction:Dial")
        bridge_ctl = session.control
        if bridge_ctl is not None and bridge_ctl.module.code == "baton.bridge":
            _watch_bridge(session, bridge_ctl, info)
        return STOP

    # -- Conference and Queue (conference.py, queues.py) -----------------------------
    async def verb_enqueue(self, verb: Verb):
        return await queues.verb_enqueue(self, verb)

    # -- letting go -------------------------------------------------------------------
    def stop(self, reason: str) -> None:
        """Control has left: cancel the task and let go of media, queues and rooms."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
        w = self.waiter
        if w is not None and not w.done():
            w.cancel()
        self.stop_player()
        if self.participant is not None:
            self.participant.leave("hangup" if reason == "hangup" else "left")
            self.participant = None
        if self.member is not None:
            m = self.member
            self.member = None
            if not self.shared.queues.leave(m) and m.connect.done() \
                    and not m.connect.cancelled():
                # Taken by an agent but never joined: the agent's room ends.
                m.connect.result().end()
            if not m.connect.done():
                m.connect.cancel()
        rec = self.recording
        if rec is not None and not rec.finished:
            self.recording = None
            verb, sid, _path, doc_url = self.recording_verb
            if reason == "hangup":
                # TwiML requests the action after a hang-up too (Digits=hangup), and ignores it.
                def after(result, verb=verb, sid=sid, doc_url=doc_url):
                    if result["duration"] <= 0:
                        return
                    params = self._recorded(verb, sid, result)
                    action = verb.get("action")
                    url = urljoin(doc_url, action) if action else doc_url
                    self.fire(url, verb.get("method", "POST"),
                              {**params, "CallStatus": "completed"})
                rec.on_done = after
            else:
                rec.on_done = None
            rec.stop("hangup")
        # In-band DTMF detection stays on: the next module may be listening too.


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _watch_bridge(session, bridge_ctl, info: dict) -> None:
    """Note when the dialled party answers and when the bridge ends (DialCallDuration):
    `baton.bridge` tells nobody, so look four times a second while it holds control."""
    loop = session.engine.loop

    def check():
        state = bridge_ctl.state
        if state is not None and info["answered"] is None and getattr(state, "answered", False):
            info["answered"] = time.monotonic()
            call = getattr(state, "call", None)
            info["sid"] = getattr(call, "call_id", "") or ""
        if not bridge_ctl.active or session.ended:
            if info["ended"] is None:
                info["ended"] = time.monotonic()
            return
        loop.call_later(0.25, check)

    loop.call_later(0.05, check)
