"""`baton.echo`: answer and send back what the caller sends (a media loop test)."""
from __future__ import annotations

from engine.modules.hold import HoldModule
from ext.kernels import rtp


class EchoModule(HoldModule):
    code = "baton.echo"
    level = "basic"

    def started(self, ctl) -> None:
        ch = ctl.caller.channel
        if ch is not None:
            ch.echo()

    def media_ready(self, ctl, leg) -> None:
        leg.open_channel()
        self.started(ctl)

    def revoke(self, ctl, reason: str) -> None:
        ch = ctl.caller.channel
        if ch is not None and ch.source == rtp.SOURCE_ECHO:
            ch.silence()
