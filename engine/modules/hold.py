"""`baton.hold`: answer the call and hold it (media answered, silence) until the caller hangs up."""
from __future__ import annotations

from engine.modules.base import Module, answer_caller


class HoldModule(Module):
    code = "baton.hold"
    level = "basic"

    def take(self, ctl) -> None:
        leg = ctl.caller
        ring = float(ctl.params.get("ring_seconds", 0) or 0)
        if ring > 0 and not leg.answered and leg.dialog is not None:
            leg.dialog.provisional(180)
            ctl.later(ring, self._answer, ctl)
        else:
            self._answer(ctl)

    def _answer(self, ctl) -> None:
        if answer_caller(ctl):
            self.started(ctl)

    def started(self, ctl) -> None:
        ch = ctl.caller.channel
        if ch is not None:
            ch.silence()
