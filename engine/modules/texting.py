"""`baton.bot`: a keyword bot for text conversations.

Params: `reply` (the answer to every text; `{Body}` and `{From}` are replaced
by the text and its sender; empty: no answer), `keywords` (a table KEYWORD ->
outlet: a text that is exactly the keyword, in any case, leaves through that
outlet, e.g. `{ AGENT = "agent" }`, and the module behind it gets the text).
"""
from __future__ import annotations

from engine.modules.base import Module


class BotModule(Module):
    code = "baton.bot"
    level = "application"
    texting = True
    outlets = ("done",)

    @classmethod
    def check_params(cls, params: dict) -> None:
        if not isinstance(params.get("reply", ""), str):
            raise ValueError("reply: a string")
        kw = params.get("keywords", {})
        if not isinstance(kw, dict) or not all(isinstance(v, str) for v in kw.values()):
            raise ValueError("keywords: a table of KEYWORD = \"outlet\"")

    def take(self, ctl) -> None:
        ctl.state = {k.strip().upper(): v for k, v in ctl.params.get("keywords", {}).items()}

    def on_text(self, ctl, message) -> None:
        outlet = (ctl.state or {}).get(message.body.strip().upper())
        if outlet is not None:
            ctl.release(outlet)
            return
        reply = ctl.params.get("reply", "")
        if reply:
            text = reply.replace("{Body}", message.body).replace("{From}", message.frm)
            ctl.engine.messaging.send(ctl.session, text)
