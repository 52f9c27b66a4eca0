"""Recording what a leg hears into a WAV file (finish on key, max length, silence, beep).

The samples are captured by the media clock in C; the WAV is written in the
executor, never on the event loop.
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np

from engine.media import signals, wav

log = logging.getLogger("baton.media.recording")

RATE = 8000


class Recording:
    """One recording on one leg. Feed it the leg's media events; `on_done(result)`
    gets {"path", "duration", "reason", "digits"} once the file is written."""

    def __init__(self, leg, path: str, *, max_length: float = 3600.0, silence: float = 5.0,
                 finish_on_key: str = "1234567890*#", beep: bool = True, trim: bool = False,
                 on_done=None):
        self.leg = leg
        self.path = path
        self.max_length = max(0.1, float(max_length))
        self.silence = float(silence)
        self.finish_on_key = finish_on_key
        self.beep = beep
        self.trim = trim
        self.on_done = on_done
        self.recorder = None
        self.beep_player = None
        self.finished = False
        self.digits = ""
        self.started_at = None

    def start(self) -> None:
        from ext.kernels import rtp

        ch = self.leg.open_channel()
        if ch is None:
            self._finish("no-media")
            return
        if self.beep:
            self.beep_player = rtp.Player(signals.beep(), 1)
            ch.play(self.beep_player)
        else:
            self._record()

    def _record(self) -> None:
        from ext.kernels import rtp

        ch = self.leg.channel
        if ch is None:
            self._finish("no-media")
            return
        buf = np.zeros(int(self.max_length * RATE), dtype=np.int16)
        frames = int(self.silence / 0.02) if self.silence > 0 else 0
        self.recorder = rtp.Recorder(buf, frames)
        ch.recorder = self.recorder
        self.started_at = time.monotonic()

    def media_event(self, kind: str, detail) -> bool:
        """Returns True when the event was this recording's."""
        if self.finished:
            return False
        if kind == "play-done" and self.beep_player is not None and self.recorder is None:
            self.beep_player = None
            self._record()
            return True
        if kind == "dtmf" and detail in self.finish_on_key:
            self.digits = detail
            self._finish("finish-key")
            return True
        if kind == "record-full":
            self._finish("max-length")
            return True
        if kind == "record-silence":
            self._finish("silence")
            return True
        return False

    def stop(self, reason: str = "stopped") -> None:
        if not self.finished:
            self._finish(reason)

    def _finish(self, reason: str) -> None:
        self.finished = True
        ch = self.leg.channel
        samples = np.zeros(0, dtype=np.int16)
        if self.recorder is not None:
            samples = np.array(self.recorder.samples(), dtype=np.int16, copy=True)
            if ch is not None and ch.recorder is self.recorder:
                ch.recorder = None
        if reason == "silence" and self.silence > 0:
            # The trailing silence that ended the recording is not part of the message.
            samples = samples[:max(0, len(samples) - int(self.silence * RATE))]
        if self.trim and len(samples):
            samples = signals.trim_silence(samples)
        loop = self.leg.session.engine.loop
        loop.create_task(self._write(samples, reason))

    async def _write(self, samples, reason: str) -> None:
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            await wav.write_wav(self.path, samples, RATE)
        except Exception:
            log.exception("could not write recording %s", self.path)
            reason = "write-failed"
        if self.on_done is not None:
            self.on_done({"path": self.path, "duration": round(len(samples) / RATE, 2),
                          "reason": reason, "digits": self.digits})
