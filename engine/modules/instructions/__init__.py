"""`baton.instructions`: run TwiML-style instruction documents fetched over HTTP.

Params: `url` (the document, required), `method` (GET or POST, default
POST), `fallback_url` / `fallback_method` (tried with ErrorCode and ErrorUrl
when a document cannot be fetched or used), `timeout` (seconds for a whole
request, default 10), `connect_timeout` (default 3), `trunk` (for
`<Dial><Number>` to numbers outside this engine), `voice` (the default
`<Say>` voice), `sounds_dir` (another directory `<Play>file:...</Play>` may
read). Every other param is sent to the app with each request.

Outlets: `done` (the document ran out; without it the call ends, as in
TwiML), `fallback` (no usable document; without it the caller hears an
apology and the call ends), and whatever `<Redirect>outlet:NAME</Redirect>`
names. The verb reference is docs/instructions.md.
"""
from __future__ import annotations

from engine.modules.base import Module
from engine.modules.instructions.fetch import Fetcher, FetchError, baton_signature, twilio_signature, verify_baton_signature
from engine.modules.instructions.parser import Document, DocumentError, Verb, parse
from engine.modules.instructions.queues import Queues
from engine.modules.instructions.verbs import SAVED_KEY, Runner, shared_for, shutdown

__all__ = ["InstructionsModule", "shutdown", "parse", "Document", "DocumentError", "Verb",
           "Fetcher", "FetchError", "Queues", "baton_signature", "twilio_signature",
           "verify_baton_signature"]


class InstructionsModule(Module):
    """The application-level module behind every instruction URI."""

    code = "baton.instructions"
    level = "application"
    forwards = True
    texting = True            # a conversation's texts run MessagingResponse documents
    outlets = ("done", "fallback")

    def __init__(self, engine, params: dict | None = None):
        super().__init__(engine, params)
        self.shared = shared_for(engine)

    def take(self, ctl) -> None:
        session = ctl.session
        if session.kind == "messaging":
            return      # each text fetches its document (on_text)
        runner = Runner(self, ctl)
        ctl.state = runner
        resume = None
        token = ctl.params.get("_resume")
        if token is not None:
            saved = session.saved.get(SAVED_KEY)
            if saved is not None and saved.get("token") == token:
                resume = session.saved.pop(SAVED_KEY)
        runner.start(resume)

    def on_text(self, ctl, message) -> None:
        if ctl.session.kind != "messaging":
            return      # a text inside a call: the voice document is not interrupted
        from engine.modules.instructions import messaging

        self.shared.fetcher.fire(messaging.run(self.shared, ctl, message))

    def media_event(self, ctl, leg, kind: str, detail) -> None:
        runner = ctl.state
        if isinstance(runner, Runner) and leg is ctl.caller:
            runner.on_media(kind, detail)

    def revoke(self, ctl, reason: str) -> None:
        runner = ctl.state
        if isinstance(runner, Runner):
            runner.stop(reason)
        if reason == "hangup":
            ctl.session.saved.pop(SAVED_KEY, None)
