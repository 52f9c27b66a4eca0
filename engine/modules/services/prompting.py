"""What the service modules share: prompts (text or WAV, barge-in) that collect
DTMF keys, and the checks of the prompt params they all accept.

A `Prompter` is a module's per-session state (`ctl.state`). `ask()` renders
one or more parts (spoken text or WAV files) into one prompt, plays it on the
caller's channel and collects keys: a key during the prompt stops it
(barge-in), a key while the prompt is still being rendered means it is never
played. Collection ends at `max_digits` keys, at the finish key, or after
`timeout` seconds without a key once the prompt has ended; the module's
callback gets the keys and why collection ended. `say()` only plays.
"""
from __future__ import annotations

import logging
import math
import os

from engine.media.commands import gather as gathering
from engine.media.commands.digits import EVENTS as KEYS
from engine.modules.base import Module, answer_caller
from engine.media.commands.prompt import render, start_player
from engine.modules.menu import PromptState

log = logging.getLogger("baton.modules.services")

MAX_TEXT = 2000           # characters of one spoken prompt
MAX_TIMEOUT = 120.0       # seconds waiting for a key
MAX_RETRIES = 10
# The layer's reasons as the services name them to their callbacks.
REASONS = {gathering.NUM_DIGITS: "complete", gathering.FINISH_KEY: "finish",
           gathering.TIMEOUT: "timeout", gathering.STOPPED: "stopped"}


class Prompter(PromptState):
    """One session's prompt and key collection (see the module docstring)."""

    def __init__(self, ctl):
        super().__init__()
        self.ctl = ctl
        self.gather: gathering.Gather | None = None   # while collecting keys
        self.callback = None
        self.serial = 0

    # -- asking -------------------------------------------------------------------
    def ask(self, parts, callback, *, max_digits: int = 1, finish_on_key: str = "",
            timeout: float = 5.0, voice: str = "en", language: str | None = None) -> None:
        """Play `parts` ([(text, file), ...]) and collect keys; then
        `callback(digits, reason)` with reason `complete` (max_digits reached),
        `finish` (the finish key, not included in digits) or `timeout`."""
        self._reset()
        self.callback = callback
        self.gather = gathering.Gather(self.ctl.later, num_digits=max_digits,
                                       finish_on_key=finish_on_key, timeout=timeout,
                                       on_done=self._gathered, leading_finish=False)
        self._start(parts, voice, language)

    def say(self, parts, callback, *, voice: str = "en", language: str | None = None) -> None:
        """Play `parts`, then `callback("", "played")`; keys are ignored meanwhile."""
        self._reset()
        self.callback = callback
        self._start(parts, voice, language)

    def _reset(self) -> None:
        self.stop(self.ctl)
        self.serial += 1
        self.player = None
        self.digits = ""
        g, self.gather = self.gather, None
        if g is not None:
            g.on_done = None
            g.stop()

    def _start(self, parts, voice, language) -> None:
        ctl = self.ctl
        self.task = ctl.engine.loop.create_task(self._play(self.serial, list(parts), voice,
                                                           language))

    async def _play(self, serial: int, parts, voice, language) -> None:
        import numpy as np

        pcm = []
        for text, file in parts:
            if not text and not file:
                continue
            try:
                pcm.append(await render(self.ctl, text, file, voice, language))
            except Exception as exc:
                log.warning("session %s: prompt failed: %s", self.ctl.session.id, exc)
        if not self.ctl.active or serial != self.serial:
            return
        if pcm and not (self.gather is not None and self.gather.digits):
            audio = pcm[0] if len(pcm) == 1 else np.concatenate(pcm)
            self.player = start_player(self.ctl, audio)
        if self.player is None:
            self._prompt_over()

    def _prompt_over(self) -> None:
        if self.gather is not None:
            self.gather.arm()
        else:
            self._finish("", "played")

    def _gathered(self, g: gathering.Gather) -> None:
        if g is self.gather:
            self.gather = None
            self.digits = g.digits
            self._finish(g.digits, REASONS[g.reason])

    def _finish(self, digits: str, reason: str) -> None:
        log.debug("session %s: keys %r (%s)", self.ctl.session.id, digits, reason)
        cb = self.callback
        self.callback = None
        if cb is not None and self.ctl.active:
            cb(digits, reason)

    # -- media events (the module passes them on) ---------------------------------
    def media_event(self, leg, kind: str, detail) -> None:
        ctl = self.ctl
        if leg is not ctl.caller:
            return
        if kind == "play-done" and self.player is not None:
            self.player = None
            self._prompt_over()
        elif kind == "dtmf" and self.gather is not None:
            self._key(str(detail))

    def _key(self, key: str) -> None:
        if self.player is not None or (self.task is not None and not self.task.done()):
            self.stop(self.ctl)      # barge-in
            self.player = None
        # A finish key before any digit is the tail of the last entry (e.g. "11#"
        # where two digits were already enough): the gather ignores it.
        self.gather.key(key)

    def listen(self) -> None:
        """Detect DTMF tones in the audio when the caller's SDP has no RFC 4733."""
        ctl = self.ctl
        ch = ctl.caller.channel
        if ch is not None and ctl.caller.negotiated is not None and \
                ctl.caller.negotiated.dtmf_pt is None and not ch.detecting:
            ch.detect_dtmf(True)

    def close(self) -> None:
        """Control has left the module: stop the prompt and any in-band detector."""
        self.serial += 1
        self.callback = None
        g, self.gather = self.gather, None
        if g is not None:
            g.on_done = None
            g.stop()
        self.stop(self.ctl)
        ch = self.ctl.caller.channel
        if ch is not None and ch.detecting:
            ch.detect_dtmf(False)


class PromptingModule(Module):
    """A service module whose per-session state (`ctl.state`) is a Prompter:
    answering the caller, passing media events on, letting go of the prompt."""

    def begin(self, ctl, state_class=Prompter):
        """Answer the caller and make the session's Prompter (listening for
        in-band DTMF when needed); None when the caller could not be answered."""
        if not answer_caller(ctl):
            return None
        state = ctl.state = state_class(ctl)
        state.listen()
        return state

    @staticmethod
    def opt(ctl, table: dict, key: str, default=None):
        """`key` of `table` (a menu, a question), else the node's param, else `default`."""
        v = table.get(key)
        return ctl.params.get(key, default) if v is None else v

    def media_event(self, ctl, leg, kind, detail) -> None:
        if isinstance(ctl.state, Prompter):
            ctl.state.media_event(leg, kind, detail)

    def revoke(self, ctl, reason: str) -> None:
        if isinstance(ctl.state, Prompter):
            ctl.state.close()


# -- param checks (ValueError("KEY: PROBLEM"), see Module.check_params) -----------------

def check_keys(params: dict, known, where: str = "") -> None:
    for k in params:
        if k not in known:
            raise ValueError(f"{where}{k}: unknown key (known: {', '.join(sorted(known))})")


def check_text(params: dict, key: str, where: str = "", required: bool = False) -> None:
    v = params.get(key)
    if v is None:
        if required:
            raise ValueError(f"{where}{key}: required")
        return
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"{where}{key}: a non-empty string")
    if len(v) > MAX_TEXT:
        raise ValueError(f"{where}{key}: longer than {MAX_TEXT} characters")


def check_file(params: dict, key: str, where: str = "") -> None:
    v = params.get(key)
    if v is None:
        return
    if not isinstance(v, str) or not v:
        raise ValueError(f"{where}{key}: a path to a WAV file")
    if not os.path.isfile(v):
        raise ValueError(f"{where}{key}: no such file {v!r}")


def check_number(params: dict, key: str, lo: float, hi: float, where: str = "",
                 integer: bool = False) -> None:
    v = params.get(key)
    if v is None:
        return
    kinds = (int,) if integer else (int, float)
    if isinstance(v, bool) or not isinstance(v, kinds) or \
            (isinstance(v, float) and not math.isfinite(v)) or not lo <= v <= hi:
        what = "an integer" if integer else "a number"
        raise ValueError(f"{where}{key}: {what} from {lo:g} to {hi:g}, not {v!r}")


def check_bool(params: dict, key: str, where: str = "") -> None:
    v = params.get(key)
    if v is not None and not isinstance(v, bool):
        raise ValueError(f"{where}{key}: true or false, not {v!r}")


def check_key_set(params: dict, key: str, where: str = "", allow_empty: bool = False) -> None:
    v = params.get(key)
    if v is None:
        return
    if not isinstance(v, str) or (not v and not allow_empty) or any(c not in KEYS for c in v):
        raise ValueError(f"{where}{key}: DTMF keys from {KEYS!r}, not {v!r}")


def check_prompt(params: dict, where: str = "", required: bool = False,
                 text: str = "prompt", file: str = "prompt_file") -> None:
    """A prompt is `text` (spoken) or `file` (a WAV), not both."""
    if text in params and file in params:
        raise ValueError(f"{where}{text}: give {text} or {file}, not both")
    if required and text not in params and file not in params:
        raise ValueError(f"{where}{text}: required (or {file})")
    check_text(params, text, where)
    check_file(params, file, where)


def check_common(params: dict, where: str = "") -> None:
    """`voice`, `language`, `timeout`, `retries`."""
    for k in ("voice", "language"):
        v = params.get(k)
        if v is not None and (not isinstance(v, str) or not v or len(v) > 40):
            raise ValueError(f"{where}{k}: an espeak-ng voice name such as en or en-us")
    check_number(params, "timeout", 0.5, MAX_TIMEOUT, where)
    check_number(params, "retries", 0, MAX_RETRIES, where, integer=True)
