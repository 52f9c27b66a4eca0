"""SIP MESSAGE, pager mode (RFC 3428): the checks on a received one and the client that sends one.

A received MESSAGE is checked here in the order RFC 3261 8.2.3 gives, in
SIP's own terms: a body encoding other than identity is 415 with
Accept-Encoding; a Content-Type other than `text/plain` is 415 with Accept
(RFC 3428 7: the UAS lists what it accepts); a body over the configured size
is 413; a body that is missing or not UTF-8 is 400 naming the problem.

`OutgoingMessage` sends one MESSAGE in a non-INVITE client transaction
(RFC 3261 17.1.2: Timer E retransmits over UDP, Timer F gives up and counts
as 408), answers one digest challenge, and reports its final status.
"""
from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

from engine.sip import build
from engine.sip.transaction import client_key
from engine.sip.uac import answer_challenge, open_flow

log = logging.getLogger("baton.sip.pager")

ACCEPT = "text/plain"
DEFAULT_MAX_BYTES = 4096


@dataclass
class Answer:
    """The answer to a received MESSAGE: the SIP status, its reason and headers."""
    status: int
    reason: str | None = None
    headers: tuple = ()


def content_type(msg) -> tuple[str, str]:
    """(media type, charset) of `msg`'s body, lower case; ("", "") without Content-Type."""
    ct = msg.get("content-type") or ""
    kind, _, rest = ct.partition(";")
    charset = ""
    for p in rest.split(";"):
        k, _, v = p.partition("=")
        if k.strip().lower() == "charset":
            charset = v.strip().strip('"').lower()
    return kind.strip().lower(), charset


def received_text(msg, max_bytes: int = DEFAULT_MAX_BYTES) -> str | Answer:
    """The text of a received MESSAGE, or the Answer that refuses it."""
    enc = msg.get("content-encoding")
    if enc and enc.strip().lower() != "identity":
        return Answer(415, headers=(("accept-encoding", "identity"), ("accept", ACCEPT)))
    body = msg.body or b""
    if len(body) > max_bytes:
        # RFC 3261 21.4.11; RFC 3428 8: a UAS may refuse what is too large for it.
        return Answer(413, reason="Message Body Too Large")
    kind, charset = content_type(msg)
    if not body:
        return Answer(400, reason="Missing Message Body")
    if kind != ACCEPT:
        return Answer(415, headers=(("accept", ACCEPT),))
    if charset not in ("", "utf-8", "us-ascii"):
        return Answer(415, reason="Unsupported Charset", headers=(("accept", ACCEPT + ";charset=UTF-8"),))
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return Answer(400, reason="Body Is Not UTF-8")


class OutgoingMessage:
    """One MESSAGE on its way: `await send()` returns the final SIP status
    (408 for a timeout, 503 when no transport reaches the target)."""

    def __init__(self, core, target: str, *, from_uri: str, to_uri: str | None = None,
                 body: str, destination: tuple | None = None, transport: str | None = None,
                 credentials: tuple | None = None, headers=(), flow=None):
        self.core = core
        self.target = target
        self.from_uri = from_uri
        self.to_uri = to_uri or f"<{target}>"
        self.body = body.encode("utf-8")
        self.destination = destination
        self.transport = transport
        self.credentials = credentials
        self.extra_headers = list(headers)
        self.call_id = f"{secrets.token_hex(10)}@baton"
        self.tag = build.new_tag()
        self.cseq = 1
        self.flow = flow        # a given flow: the way back to who sent us a text
        self.ct = None
        self.auth_tries = 0
        self.status = 0
        self.reason = ""
        self._done = None

    async def send(self) -> int:
        import asyncio

        self._done = asyncio.get_running_loop().create_future()
        try:
            if self.flow is None:
                self.flow = await open_flow(self.core, self.target, self.destination, self.transport)
        except (OSError, ValueError) as exc:
            log.info("MESSAGE to %s: no route: %s", self.target, exc)
            return self._final(503 if isinstance(exc, OSError) else 416, str(exc))
        try:
            self._send()
        except ValueError as exc:     # a target or address no request line may carry
            return self._final(416, str(exc))
        return await self._done

    def _send(self, authorization: tuple | None = None) -> None:
        core = self.core
        branch = build.new_branch()
        h = [("via", f"SIP/2.0/{self.flow.transport.name} {core.sent_by(self.flow)}"
                     f";branch={branch};rport"),
             ("max-forwards", "70"), ("from", f"{self.from_uri};tag={self.tag}"),
             ("to", self.to_uri), ("call-id", self.call_id), ("cseq", f"{self.cseq} MESSAGE")]
        if authorization is not None:
            h.append(authorization)
        h += self.extra_headers
        if core.user_agent:
            h.append(("user-agent", core.user_agent))
        h.append(("content-type", "text/plain;charset=UTF-8"))
        data = build.request("MESSAGE", self.target, h, self.body)
        core.stats["sent_MESSAGE"] += 1
        self.ct = core.transactions.new_client(client_key(branch, "MESSAGE"), self.flow, data,
                                               False, self._on_response, None)

    def _on_response(self, ct, msg) -> None:
        if ct is not self.ct or self._done.done():
            return
        if msg is None:
            # RFC 3261 8.1.3.1: Timer F or a transport error counts as 408.
            self._final(408, "Request Timeout")
            return
        status = msg.status
        if status < 200:
            return
        if status in (401, 407) and self.credentials and self.auth_tries == 0:
            header = answer_challenge(msg, "MESSAGE", self.target, self.credentials, self.body)
            if header is not None:
                # RFC 3261 22.2: again with credentials, same Call-ID, CSeq + 1.
                self.auth_tries += 1
                self.cseq += 1
                self._send(header)
                return
        self._final(status, msg.reason or "")

    def _final(self, status: int, reason: str) -> int:
        self.status = status
        self.reason = reason
        if self._done is not None and not self._done.done():
            self._done.set_result(status)
        return status
