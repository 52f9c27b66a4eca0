"""`baton.record`: record a message (voicemail style), then leave through `done`.

Params: `prompt` (text said first), `max_length` (seconds, default 120),
`silence` (seconds of quiet that end it, default 5), `finish_on_key`
(default "#"), `beep` (default true), `trim` (trim silence, default true).
The `done` outlet receives `RecordingPath` and `RecordingDuration`.
"""
from __future__ import annotations

from engine.media.files import recording_path
from engine.media.recording import Recording
from engine.modules.base import Module, answer_caller
from engine.media.commands.prompt import render_or_none, start_player
from engine.modules.menu import PromptState


class RecordModule(Module):
    code = "baton.record"
    level = "application"
    outlets = ("done",)

    def take(self, ctl) -> None:
        if not answer_caller(ctl):
            return
        ctl.state = PromptState()
        prompt = ctl.params.get("prompt")
        if prompt:
            ctl.state.task = ctl.engine.loop.create_task(self._prompt(ctl, prompt))
        else:
            self._start(ctl)

    async def _prompt(self, ctl, text) -> None:
        pcm = await render_or_none(ctl, "record prompt", text, None, ctl.params.get("voice", "en"))
        if not ctl.active:
            return
        if pcm is None:
            self._start(ctl)
        else:
            ctl.state.player = start_player(ctl, pcm)

    def _start(self, ctl) -> None:
        p = ctl.params
        session = ctl.session
        path = recording_path(ctl.engine.cfg.data_dir, session.account)
        rec = Recording(ctl.caller, path, max_length=float(p.get("max_length", 120)),
                        silence=float(p.get("silence", 5)),
                        finish_on_key=str(p.get("finish_on_key", "#")),
                        beep=bool(p.get("beep", True)), trim=bool(p.get("trim", True)),
                        on_done=lambda result: self._done(ctl, result))
        ctl.state.recording = rec
        rec.start()

    def _done(self, ctl, result) -> None:
        ctl.engine.stamper.action(ctl.session, self.code, "recording_seconds",
                                  int(round(result["duration"])))
        ctl.session.params["RecordingPath"] = result["path"]
        ctl.session.params["RecordingDuration"] = result["duration"]
        ctl.session.params["RecordingReason"] = result["reason"]
        ctl.release("done", RecordingPath=result["path"], RecordingDuration=result["duration"],
                    RecordingReason=result["reason"])

    def media_event(self, ctl, leg, kind, detail) -> None:
        state = ctl.state
        if state is None or leg is not ctl.caller:
            return
        if kind == "play-done" and state.player is not None and state.recording is None:
            state.player = None
            self._start(ctl)
            return
        if state.recording is not None:
            state.recording.media_event(kind, detail)

    def revoke(self, ctl, reason: str) -> None:
        state = ctl.state
        if state is None:
            return
        if state.recording is not None and not state.recording.finished:
            state.recording.on_done = None
            state.recording.stop("hangup")
        state.stop(ctl)
