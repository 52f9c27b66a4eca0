"""`baton.menu` (a DTMF menu) and `baton.play` (say or play, then go on).

`baton.menu` params: `prompt` (text, spoken with espeak-ng) or `prompt_file`
(WAV), `voice`, `timeout` (seconds to wait for a key after the prompt,
default 5), `retries` (default 2), `invalid_prompt`. Each key pressed leaves
through the outlet of the same name (`"1"`, `"*"`...); a key with no outlet is
invalid and the prompt is repeated; after the retries the `timeout` outlet
(no key) or `invalid` outlet (wrong keys) is followed. Pressing a key during
the prompt stops it (barge-in).

`baton.play` params: `text` or `file`, `voice`, `loop`; then the `done`
outlet, or the end of the call when it is not wired.
"""
from __future__ import annotations

from engine.media.commands.prompt import render_or_none, start_player
from engine.modules.base import Module, answer_caller


class PromptState:
    """What a prompting module holds for one session: the prompt being rendered
    (`task`), the player on the caller's channel, and what it collected."""

    def __init__(self):
        self.player = None
        self.digits = ""
        self.tries = 0
        self.invalid = 0
        self.timer = None
        self.task = None
        self.recording = None

    def stop(self, ctl) -> None:
        """Let go of the prompt: cancel a render in flight, and silence the
        caller's channel if our player is still what it plays."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
        ch = ctl.caller.channel
        if ch is not None and self.player is not None and ch.player is self.player:
            ch.silence()


class MenuModule(Module):
    code = "baton.menu"
    level = "service"
    outlets = ("0-9 * # A-D", "timeout", "invalid")

    def take(self, ctl) -> None:
        if not answer_caller(ctl):
            return
        ctl.state = PromptState()
        ch = ctl.caller.channel
        if ch is not None and ctl.caller.negotiated is not None and \
                ctl.caller.negotiated.dtmf_pt is None:
            ch.detect_dtmf(True)  # no RFC 4733: listen for tones in the audio
        self._prompt(ctl)

    def _prompt(self, ctl, text: str | None = None) -> None:
        state = ctl.state
        state.tries += 1
        p = ctl.params
        state.task = ctl.engine.loop.create_task(self._play(
            ctl, text or p.get("prompt"), None if text else p.get("prompt_file")))

    async def _play(self, ctl, text, file) -> None:
        pcm = await render_or_none(ctl, "menu prompt", text, file, ctl.params.get("voice", "en"))
        if not ctl.active:
            return
        if pcm is not None and not ctl.state.digits:
            ctl.state.player = start_player(ctl, pcm)
        if ctl.state.player is None:
            self._arm_timeout(ctl)

    def _arm_timeout(self, ctl) -> None:
        state = ctl.state
        if state.timer is not None:
            state.timer.cancel()
        state.timer = ctl.later(float(ctl.params.get("timeout", 5)), self._timeout, ctl)

    def media_event(self, ctl, leg, kind, detail) -> None:
        state = ctl.state
        if state is None or leg is not ctl.caller:
            return
        if kind == "play-done" and state.player is not None:
            state.player = None
            self._arm_timeout(ctl)
        elif kind == "dtmf":
            self._key(ctl, detail)

    def _key(self, ctl, key: str) -> None:
        state = ctl.state
        ch = ctl.caller.channel
        if state.player is not None and ch is not None and ch.player is state.player:
            ch.silence()  # barge-in
        state.player = None
        if state.timer is not None:
            state.timer.cancel()
        if key in ctl.node.outlets:
            ctl.release(key, Digits=key)
            return
        state.invalid += 1
        if state.tries > int(ctl.params.get("retries", 2)):
            ctl.release("invalid" if "invalid" in ctl.node.outlets else "timeout", Digits=key)
            return
        self._prompt(ctl, ctl.params.get("invalid_prompt") or None)

    def _timeout(self, ctl) -> None:
        state = ctl.state
        if state.tries > int(ctl.params.get("retries", 2)):
            ctl.release("timeout")
            return
        self._prompt(ctl)

    def revoke(self, ctl, reason: str) -> None:
        state = ctl.state
        if state is None:
            return
        state.stop(ctl)
        ch = ctl.caller.channel
        if ch is not None and ch.detecting:
            ch.detect_dtmf(False)


class PlayModule(Module):
    code = "baton.play"
    level = "application"
    outlets = ("done",)

    def take(self, ctl) -> None:
        if not answer_caller(ctl):
            return
        ctl.state = PromptState()
        ctl.state.task = ctl.engine.loop.create_task(self._run(ctl))

    async def _run(self, ctl) -> None:
        p = ctl.params
        pcm = await render_or_none(ctl, "play", p.get("text"), p.get("file"), p.get("voice", "en"))
        if not ctl.active:
            return
        if pcm is None:
            ctl.release("done")
            return
        ctl.state.player = start_player(ctl, pcm, int(p.get("loop", 1)))

    def media_event(self, ctl, leg, kind, detail) -> None:
        if kind == "play-done" and leg is ctl.caller and ctl.state is not None \
                and ctl.state.player is not None:
            ctl.state.player = None
            ctl.release("done")

    def revoke(self, ctl, reason: str) -> None:
        if ctl.state is not None:
            ctl.state.stop(ctl)


__all__ = ["MenuModule", "PlayModule", "PromptState"]
