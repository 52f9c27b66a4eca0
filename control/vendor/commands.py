"""The vendor commands: answer, play, say, gather, record, dial, enqueue,
conference, digits, values, hang-up, transfer and release, each `_cmd_<action>`
of `VendorModule`, which `Offers.dispatch` calls; and the media they start.

Each handler checks its own gRPC fields (`INVALID_ARGUMENT` naming the field)
and leaves the work to the media-command layer (engine/media/commands/).
"""
from __future__ import annotations

import inspect
import os
import re
import time
from collections.abc import Callable

from engine.sessions import apps as apps_mod
from engine.sessions.apps import Node
from engine.media.commands import digits as dtmf_out
from engine.media.commands import gather as gathering
from engine.media.commands.digits import EVENTS as DTMF_KEYS
from engine.media.files import NO_SUCH_FILE, confine, recording_path
from engine.media.wav import AudioError, load_wav
from engine.modules.base import answer_caller
from engine.sessions.dialing import OutboundDenied, operator_params, permit
from engine.sip.uri import check_user_part, sip_uri

from control import vendor_texts
from proto import pb

from control.vendor.offers import (FAILED_PRECONDITION, NOT_FOUND, OK, PERMISSION_DENIED,
                                   UNIMPLEMENTED, _HANDED_OVER, CommandError, Offers,
                                   VendorProcess, VendorState, _ack, _event, invalid, mh)

DIAL_OUTLETS = (("done", "completed"), ("busy", "busy"), ("no-answer", "no-answer"),
                ("failed", "failed"))
URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")   # RFC 3986 3.1


def _caller_params(params: dict, field: str) -> dict:
    """Params a vendor passes on: never the operator's own (a trunk, a sounds
    directory, timeouts), refused with PERMISSION_DENIED naming them."""
    bad = operator_params(params)
    if bad:
        raise CommandError(PERMISSION_DENIED, f"{field}: operator-only parameters: "
                                              f"{', '.join(bad)}", field)
    return params


def _permit(engine, session, to: str, trunk: str | None, vendor: str) -> None:
    """A dial the vendor and the session's account may both place, else
    PERMISSION_DENIED naming the destination."""
    try:
        permit(engine, session.account, to, trunk, vendor=vendor, count=False)
    except OutboundDenied as exc:
        raise CommandError(PERMISSION_DENIED, f"dial {to}: {exc}", "dial.to") from None


def _loops(n: int) -> int:
    """The proto's loop (0/unset: once, negative: forever) as rtp.Player's (0: forever)."""
    if n == 0:
        return 1
    return 0 if n < 0 else n


class VendorModule(Offers):
    """The module behind one vendor module code: its offers (`Offers`), commands and media."""

    def _stop_media(self, ctl, state: VendorState) -> None:
        """Let go of everything this module started on the caller's channel."""
        for t in list(state.tasks):
            t.cancel()
        state.tasks.clear()
        g, state.gather = state.gather, None
        if g is not None:
            g.on_done = None
            g.stop()
        rec = state.recording
        if rec is not None and not rec.finished:
            rec.on_done = None
            rec.stop("stopped")
        state.recording = None
        leg = ctl.session.legs[0] if ctl.session.legs else None
        ch = leg.channel if leg is not None else None
        if state.conference is not None:
            self.hub.leave_conference(ctl.session.id, ch, state.conference)
            state.conference = None
        if ch is not None:
            if state.player is not None and ch.player is state.player:
                ch.silence()
            if state.detecting and ch.detecting:
                ch.detect_dtmf(False)
        state.player = None
        state.detecting = False

    # -- texts ------------------------------------------------------------------------
    def on_text(self, ctl, m) -> None:
        state = ctl.state
        if state is None:
            return
        if state.holder is None:
            vendor_texts.keep(state, m)
        else:
            self._texts_to(ctl, [m])

    def _texts_to(self, ctl, texts: list) -> None:
        state = ctl.state
        if not ctl.active or state is None or state.holder is None:
            return
        for m in texts:
            ev = vendor_texts.received(m)
            ev.session_id, ev.offer_id, ev.time_ns = ctl.session.id, state.offer_id, m.created_wall_ns
            state.holder.send(mh.EngineMessage(event=ev))

    def _cmd_send_message(self, ctl, state, proc, cmd):
        body, to, frm = vendor_texts.check(self.engine, cmd, invalid)
        offer_id, cid = state.offer_id, cmd.command_id
        queued: list = []

        def on_status(m):
            if not queued:
                return          # refused at once: the Ack says so
            ev = vendor_texts.status_event(cid, m)
            ev.session_id, ev.offer_id, ev.time_ns = ctl.session.id, offer_id, m.updated_wall_ns
            proc.send(mh.EngineMessage(event=ev))
        m = self.engine.messaging.send(ctl.session, body, to=to, frm=frm, on_status=on_status)
        if m.status == "failed":
            raise CommandError(PERMISSION_DENIED, f"send_message.to: {m.error}", "send_message.to")
        queued.append(m)
        return {"message_sid": m.sid, "status": m.status}

    # -- media events ---------------------------------------------------------------
    def media_event(self, ctl, leg, kind: str, detail) -> None:
        state = ctl.state
        if state is None or state.holder is None or leg is not ctl.caller:
            return
        proc = state.holder
        sid = ctl.session.id
        if kind == "dtmf":
            proc.send(_event(sid, state.offer_id, dtmf=mh.Dtmf(digit=detail)))
            rec = state.recording
            if rec is not None and rec.media_event(kind, detail):
                return
            if state.gather is not None:
                self._gather_digit(ctl, state, detail)
            return
        if kind == "play-done":
            rec = state.recording
            if rec is not None and rec.media_event(kind, detail):
                return   # the recording's beep
            ch = leg.channel
            if state.player is not None and (ch is None or ch.player is not state.player):
                cmd, what = state.player_cmd, state.player_kind
                state.player = None
                if what == "gather" and state.gather is not None:
                    state.gather.arm()
                elif what == "play":
                    proc.send(_event(sid, state.offer_id, playback_finished=mh.PlaybackFinished(
                        command_id=cmd)))
            return
        if state.recording is not None:
            state.recording.media_event(kind, detail)
    # -- media helpers --------------------------------------------------------------
    def _channel(self, ctl, state: VendorState, proc: VendorProcess):
        """The caller's channel on the media clock, answering the call first if needed."""
        leg = ctl.caller
        was = leg.answered
        if not answer_caller(ctl):
            raise CommandError(FAILED_PRECONDITION,
                               "the call could not be answered (unusable SDP offer or no RTP "
                               "ports left); it has ended")
        if not was and leg.answered:
            proc.send(_event(ctl.session.id, state.offer_id,
                             leg_answered=mh.LegAnswered(leg="caller")))
        ch = leg.channel
        if ch is None:
            raise CommandError(FAILED_PRECONDITION,
                               "the caller's media address is not known yet (late SDP offer)")
        neg = leg.negotiated
        if neg is not None and neg.dtmf_pt is None and not ch.detecting:
            ch.detect_dtmf(True)  # no RFC 4733 from this caller: listen for tones
            state.detecting = True
        return ch

    def _start_player(self, ctl, state: VendorState, proc: VendorProcess, pcm, loops: int,
                      cmd_id: str, kind: str) -> None:
        from ext.kernels import rtp

        ch = self._channel(ctl, state, proc)
        self._interrupt_player(ctl, state, proc, ch)
        if state.conference is not None:
            self.hub.leave_conference(ctl.session.id, ch, state.conference)
            state.conference = None
        player = rtp.Player(pcm, loops)
        ch.play(player)
        state.player, state.player_cmd, state.player_kind = player, cmd_id, kind
        trace = self.hub.trace
        if trace is not None:
            trace("media", ctl.session.id, cmd_id, time.monotonic_ns())

    def _interrupt_player(self, ctl, state: VendorState, proc: VendorProcess, ch) -> None:
        if state.player is not None and ch is not None and ch.player is state.player:
            ch.silence()
            if state.player_kind == "play":
                proc.send(_event(ctl.session.id, state.offer_id,
                                 playback_finished=mh.PlaybackFinished(
                                     command_id=state.player_cmd, interrupted=True)))
        state.player = None

    def _files_dir(self, vendor: str) -> str:
        v = self.engine.cfg.raw.get("vendors", {}).get(vendor, {})
        d = v.get("files_dir") if isinstance(v, dict) else None
        return d or os.path.join(self.engine.cfg.data_dir, "vendors", vendor)

    def _pcm_now(self, url: str, vendor: str):
        """(pcm, None) when `url` is a file whose audio is cached, else (None, awaitable)."""
        if url.lower().startswith(("http://", "https://")):
            pcm = self.hub.url_audio().cached(url)
            return (pcm, None) if pcm is not None else (None, self._fetch_url(url))
        scheme = URL_SCHEME.match(url)
        if scheme is not None:
            raise invalid("play.url", f"{scheme.group(1)}: URLs are not played; a file path "
                                      "or an http(s) URL is required")
        # A vendor reads its own directory only; outside it, missing and unreadable are
        # one answer, so a play cannot probe the machine's files.
        path = confine(url, [self._files_dir(vendor)])
        try:
            st = os.stat(path) if path is not None else None
        except OSError:
            st = None
        if st is None:
            raise CommandError(NOT_FOUND, f"play.url: {NO_SUCH_FILE}", "play.url")
        key = (path, st.st_mtime_ns, st.st_size)
        pcm = self.hub.pcm_get(key)
        if pcm is not None:
            return pcm, None
        return None, self._load_file(path, key)

    async def _load_file(self, path: str, key):
        try:
            pcm = await load_wav(path)
        except AudioError as exc:
            raise invalid("play.url", f"not a playable WAV: {exc}") from None
        self.hub.pcm_put(key, pcm)
        return pcm

    async def _fetch_url(self, url: str):
        from engine.modules.instructions.fetch import FetchError

        try:
            return await self.hub.url_audio().load(url)
        except AudioError as exc:
            raise invalid("play.url", f"not a playable WAV: {exc}") from None
        except FetchError as exc:
            raise CommandError(FAILED_PRECONDITION, f"play.url: cannot fetch: {exc.reason}",
                               "play.url") from None

    async def _speech(self, ctl, text: str, voice: str, field: str):
        try:
            pcm = await self.engine.speech.say(text, voice=voice or "en")
        except AudioError as exc:
            msg = str(exc)
            f = f"{field}.voice" if "voice" in msg else f"{field}.text"
            raise invalid(f, msg) from None
        self.engine.stamper.action(ctl.session, self.code, "tts_characters", len(text))
        return pcm

    def _media(self, ctl, state, proc, cmd_id: str, kind: str, loops: int, pcm, pending):
        """Start a player now, or once `pending` (an awaitable of PCM) is ready."""
        state.media_seq += 1
        if pending is None:
            self._start_player(ctl, state, proc, pcm, loops, cmd_id, kind)
            return {"playing": True}
        seq = state.media_seq

        async def later():
            data = await pending
            if not ctl.active:
                raise CommandError(FAILED_PRECONDITION, "control was lost while loading audio")
            if state.media_seq != seq:
                return {"playing": False, "superseded": True}
            self._start_player(ctl, state, proc, data, loops, cmd_id, kind)
            return {"playing": True}
        return later()

    # -- the commands -----------------------------------------------------------------
    def _cmd_answer(self, ctl, state, proc, cmd):
        self._channel(ctl, state, proc)
        return {"answered": True}

    def _cmd_play(self, ctl, state, proc, cmd):
        p = cmd.play
        if not p.url.strip():
            raise invalid("play.url", "a file path or http(s) URL is required")
        self._channel(ctl, state, proc)
        pcm, pending = self._pcm_now(p.url.strip(), proc.vendor)
        return self._media(ctl, state, proc, cmd.command_id, "play", _loops(p.loop), pcm, pending)

    def _cmd_say(self, ctl, state, proc, cmd):
        s = cmd.say
        if not s.text.strip():
            raise invalid("say.text", "text to say is required")
        self._channel(ctl, state, proc)
        return self._media(ctl, state, proc, cmd.command_id, "play", _loops(s.loop), None,
                           self._speech(ctl, s.text, s.voice, "say"))

    def _cmd_stop_media(self, ctl, state, proc, cmd):
        ch = ctl.caller.channel
        state.media_seq += 1
        self._interrupt_player(ctl, state, proc, ch)
        g = state.gather
        if g is not None:
            g.stop()
        rec = state.recording
        if rec is not None and not rec.finished:
            rec.stop("stopped")
        return {}

    def _cmd_gather(self, ctl, state, proc, cmd):
        g = cmd.gather
        if g.timeout < 0 or g.timeout > 3600:
            raise invalid("gather.timeout", "seconds between 0 and 3600")
        if g.num_digits > 128:
            raise invalid("gather.num_digits", "at most 128")
        finish = g.finish_on_key if g.finish_on_key else "#"
        if finish == "none":
            finish = ""
        if any(c not in DTMF_KEYS for c in finish):
            raise invalid("gather.finish_on_key", f"keys among {DTMF_KEYS} (or 'none')")
        which = g.WhichOneof("prompt")
        if which == "say" and not g.say.text.strip():
            raise invalid("gather.say.text", "text to say is required")
        if which == "play" and not g.play.url.strip():
            raise invalid("gather.play.url", "a file path or http(s) URL is required")
        self._channel(ctl, state, proc)
        if state.gather is not None:
            state.gather.stop()
        cid = cmd.command_id
        gather = gathering.Gather(ctl.later, num_digits=int(g.num_digits),
                                  finish_on_key=finish, timeout=g.timeout or 5.0,
                                  on_done=lambda done: self._gather_done(ctl, state, done, cid))
        state.gather = gather
        if which is None:
            # No prompt: whatever plays now goes on while digits are collected.
            gather.arm()
            return {"armed": True}
        if which == "say":
            pcm, pending = None, self._speech(ctl, g.say.text, g.say.voice, "gather.say")
            loops = _loops(g.say.loop)
        else:
            try:
                pcm, pending = self._pcm_now(g.play.url.strip(), proc.vendor)
            except CommandError as exc:
                state.gather = None
                raise CommandError(exc.code, "gather." + exc.message, "gather.play.url") from None
            loops = _loops(g.play.loop)
        started = self._media(ctl, state, proc, cmd.command_id, "gather", loops, pcm, pending)
        if inspect.isawaitable(started):
            async def armed():
                try:
                    r = await started
                except BaseException:
                    if state.gather is gather:
                        state.gather = None
                    raise
                if r.get("superseded") and state.gather is gather:
                    gather.arm()
                return {"armed": True}
            return armed()
        return {"armed": True}

    def _gather_digit(self, ctl, state: VendorState, digit: str) -> None:
        ch = ctl.caller.channel
        if state.player is not None and state.player_kind == "gather" and ch is not None \
                and ch.player is state.player:
            ch.silence()   # barge-in
            state.player = None
        state.gather.key(digit)

    def _gather_done(self, ctl, state: VendorState, g: gathering.Gather, cid: str) -> None:
        if state.gather is g:
            state.gather = None
        ch = ctl.caller.channel
        if state.player is not None and state.player_kind == "gather" and ch is not None \
                and ch.player is state.player:
            ch.silence()
            state.player = None
        ctl.session.params["Digits"] = g.digits
        if state.holder is not None:
            state.holder.send(_event(ctl.session.id, state.offer_id, gather_result=mh.GatherResult(
                command_id=cid, digits=g.digits, reason=g.reason)))

    def _cmd_record(self, ctl, state, proc, cmd):
        from engine.media.recording import Recording

        r = cmd.record
        max_length = r.max_length or 120.0
        if not 0 < max_length <= 3600:
            raise invalid("record.max_length", "seconds between 0 and 3600")
        silence = r.silence if r.HasField("silence") else 5.0
        if silence < 0:
            raise invalid("record.silence", "seconds, 0 for no silence detection")
        finish = r.finish_on_key if r.finish_on_key else "#"
        if finish == "none":
            finish = ""
        if any(c not in DTMF_KEYS for c in finish):
            raise invalid("record.finish_on_key", f"keys among {DTMF_KEYS} (or 'none')")
        ch = self._channel(ctl, state, proc)
        state.media_seq += 1
        self._interrupt_player(ctl, state, proc, ch)
        if state.recording is not None and not state.recording.finished:
            state.recording.on_done = None
            state.recording.stop("stopped")
        session = ctl.session
        self.stats["recordings"] += 1
        path = recording_path(self.engine.cfg.data_dir, session.account)
        cid = cmd.command_id

        def done(result: dict) -> None:
            if state.recording is rec:
                state.recording = None
            self.engine.stamper.action(session, self.code, "recording_seconds",
                                       int(round(result["duration"])))
            session.params["RecordingPath"] = result["path"]
            session.params["RecordingDuration"] = result["duration"]
            if ctl.active and state.holder is not None:
                state.holder.send(_event(session.id, state.offer_id,
                                         recording_ready=mh.RecordingReady(
                                             command_id=cid, path=result["path"],
                                             duration=result["duration"],
                                             reason=result["reason"], digits=result["digits"])))

        rec = Recording(ctl.caller, path, max_length=max_length, silence=silence,
                        finish_on_key=finish, beep=r.beep if r.HasField("beep") else True,
                        trim=r.trim if r.HasField("trim") else True, on_done=done)
        state.recording = rec
        state.recording_cmd = cid
        rec.start()
        return {"path": path}

    def _cmd_dial(self, ctl, state, proc, cmd):
        d = cmd.dial
        to = d.to.strip()
        cfg = self.engine.cfg
        if not to:
            raise invalid("dial.to", "a SIP URI (or a number with a trunk) is required")
        if d.trunk and d.trunk not in cfg.trunks:
            raise invalid("dial.trunk", f"no trunk {d.trunk!r} in the engine's config")
        if not d.trunk and not to.lower().startswith(("sip:", "sips:")):
            raise invalid("dial.to", "must be a sip: or sips: URI unless a trunk is given")
        try:
            if d.trunk:
                check_user_part(to[4:] if to.startswith("tel:") else to, "dial.to")
            else:
                sip_uri(to, "dial.to")
            if d.caller_id:
                check_user_part(d.caller_id, "dial.caller_id")
        except ValueError as exc:
            field, _, why = str(exc).partition(": ")
            raise invalid(field, why) from None
        if d.timeout < 0 or d.timeout > 600:
            raise invalid("dial.timeout", "seconds between 0 and 600")
        if d.time_limit < 0:
            raise invalid("dial.time_limit", "seconds, 0 for no limit")
        node = ctl.node
        session = ctl.session
        _permit(self.engine, session, to, d.trunk or None, proc.vendor)
        back: dict = {}
        for outlet, status in DIAL_OUTLETS:
            # Each outcome comes back to this module code as the same node, so the
            # vendor's outlets (and fallback) still hold after the call.
            back[outlet] = Node(name=node.name, module=node.module,
                                params={**node.params, "DialCallStatus": status, "DialTo": to},
                                outlets=node.outlets, events=node.events, app=node.app)
        if "fallback" in node.outlets:
            back["fallback"] = node.outlets["fallback"]
        params: dict = {"to": to, "timeout": d.timeout or 30}
        if d.trunk:
            params["trunk"] = d.trunk
        if d.caller_id:
            params["caller_id"] = d.caller_id
        if d.time_limit:
            params["time_limit"] = d.time_limit
        bridge = Node(name=f"dial:{node.name}", module="baton.bridge", params=params,
                      outlets=back, events={"dialled-hangup": back["done"]}, app=node.app)
        self.hub.remember_resume(session.id, node.module, proc.id, pb.from_struct(d.resume))
        self._hand_over(ctl, state, proc, cmd, lambda: session.transition(bridge, "dial"))
        return _HANDED_OVER

    def _cmd_enqueue(self, ctl, state, proc, cmd):
        e = cmd.enqueue
        if not e.queue:
            raise invalid("enqueue.queue", "a queue name is required")
        service = getattr(self.engine, "callcentre", None)
        if service is None or not hasattr(service, "enqueue"):
            raise CommandError(UNIMPLEMENTED, "enqueue: the call-centre service is not running "
                                              "on this engine")
        state.by_vendor = True
        return service.enqueue(ctl, e.queue, e.priority) or {}

    def _cmd_join_conference(self, ctl, state, proc, cmd):
        j = cmd.join_conference
        name = j.name.strip()
        if not name or len(name) > 128:
            raise invalid("join_conference.name", "a name of 1 to 128 characters is required")
        ch = self._channel(ctl, state, proc)
        state.media_seq += 1
        self._interrupt_player(ctl, state, proc, ch)
        if state.conference is not None:
            self.hub.leave_conference(ctl.session.id, ch, state.conference)
            state.conference = None
        key = (ctl.session.account, name)
        size = self.hub.join_conference(ctl.session.id, ch, key, j.muted, j.listen_only)
        state.conference = key
        return {"conference": name, "participants": size}

    def _cmd_send_digits(self, ctl, state, proc, cmd):
        s = cmd.send_digits
        digits = s.digits.upper()
        if not dtmf_out.valid(digits):
            raise invalid("send_digits.digits", f"digits among {DTMF_KEYS} and w (pause)")
        duration = s.duration_ms or 100
        if not 40 <= duration <= 2000:
            raise invalid("send_digits.duration_ms", "between 40 and 2000")
        gap = s.gap_ms or 60
        if gap > 2000:
            raise invalid("send_digits.gap_ms", "at most 2000")
        ch = self._channel(ctl, state, proc)
        if state.dtmf_out is not None and not state.dtmf_out.done():
            raise CommandError(FAILED_PRECONDITION, "digits are still being sent on this session")
        if not dtmf_out.rfc4733(ch):
            # No telephone-event negotiated: in-band tones through the player.
            pcm = dtmf_out.tones(digits, duration, gap)
            self._start_player(ctl, state, proc, pcm, 1, cmd.command_id, "digits")
            return {"method": "inband", "digits": digits}
        task = self._send_rfc4733(ch, digits, duration, gap)
        state.dtmf_out = task
        return task

    async def _send_rfc4733(self, ch, digits: str, duration_ms: int, gap_ms: int) -> dict:
        await dtmf_out.send_events(ch, digits, duration_ms, gap_ms)
        return {"method": "rfc4733", "digits": digits}

    def _cmd_set_value(self, ctl, state, proc, cmd):
        v = cmd.set_value
        if not v.key or len(v.key) > 256:
            raise invalid("set_value.key", "a key of 1 to 256 characters is required")
        ctl.session.params[v.key] = pb.from_value(v.value) if v.HasField("value") else None
        return {}

    def _cmd_hangup(self, ctl, state, proc, cmd):
        reason = cmd.hangup.reason or "vendor-hangup"
        self._hand_over(ctl, state, proc, cmd, lambda: ctl.session.end(reason))
        return _HANDED_OVER

    def _cmd_transfer(self, ctl, state, proc, cmd):
        t = cmd.transfer
        target = t.target.strip()
        if not target:
            raise invalid("transfer.target", "a module code, node, URI or 'hangup' is required")
        params = _caller_params(pb.from_struct(t.params), "transfer.params")
        node = apps_mod.resolve(ctl.session.app, target, params)
        if node is None:
            raise invalid("transfer.target", f"{target!r} is neither a node of the app nor a "
                                             "module code or URI")
        app = ctl.session.app
        if isinstance(node, Node) and (app is None or target not in app.nodes) \
                and node.module == target.removeprefix("module:"):
            # A bare module code has no outlets of its own: it leaves through the calling
            # node's, so its release("done") goes on with the app as this node's would.
            node = Node(name=node.name, module=node.module, params=node.params,
                        outlets=ctl.node.outlets, events=ctl.node.events, app=node.app)
        if isinstance(node, Node) and node.module == "baton.bridge" and node.params.get("to"):
            _permit(self.engine, ctl.session, str(node.params["to"]),
                    node.params.get("trunk"), proc.vendor)
        self._hand_over(ctl, state, proc, cmd,
                        lambda: ctl.session.transition(node, "transfer"))
        return _HANDED_OVER

    def _cmd_release(self, ctl, state, proc, cmd):
        r = cmd.release
        outlet = r.outlet.strip()
        if not outlet:
            raise invalid("release.outlet", "an outlet name is required (e.g. done)")
        params = _caller_params(pb.from_struct(r.params), "release.params")
        self._hand_over(ctl, state, proc, cmd,
                        lambda: ctl.session.follow(outlet, params, reason=f"outlet:{outlet}"))
        return _HANDED_OVER

    def _hand_over(self, ctl, state, proc, cmd, act: Callable[[], None]) -> None:
        """Ack first, then let control go: the Ack precedes ControlRevoked on the stream."""
        state.by_vendor = True
        key = (proc.instance or proc.id, cmd.session_id, cmd.command_id)
        self._finish(proc, key, _ack(cmd.command_id, cmd.session_id, OK))
        act()
