"""`baton.echo`: answer and send back what the caller sends (a media loop test)."""
from __future__ import annotations

from .hold import HoldModule


class EchoModule(HoldModule):
    code = "baton.echo"
    level = "basic"

    def media_ready(self, leg) -> None:
        ch = leg.open_channel()
        if ch is not None:
            ch.echo()
