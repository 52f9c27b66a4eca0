"""Messaging documents: Twilio's `MessagingResponse`, run for each text of a conversation.

Each text is posted (or fetched with GET) to the module's `url` with Twilio's
messaging webhook parameters (`MessageSid`, `SmsSid`, `SmsMessageSid`,
`AccountSid`, `From`, `To`, `Body`, `NumSegments`, `NumMedia`, `SmsStatus`,
`ApiVersion`) plus `SessionSid`, the conversation's session id, signed as the
voice webhooks are. The answer is a `<Response>` of:

- `<Message to from action method>` text, or `<Body>` text: sends a text
  (to the sender by default); `action` is the status callback, requested with
  `MessageSid`, `MessageStatus`, `SmsStatus` and `ErrorCode` at its final status.
- `<Redirect method>URL</Redirect>`: the rest comes from URL (same parameters);
  `<Redirect>outlet:NAME</Redirect>` passes the conversation through the node's
  outlet NAME, and the module there gets the same text.
"""
from __future__ import annotations

import logging
from urllib.parse import urljoin, urlsplit

from engine.modules.instructions.fetch import FetchError
from engine.modules.instructions.parser import DocumentError, _xml_tree
from engine.modules.instructions.verbs import API_VERSION, INTERNAL_PARAMS, account_settings

log = logging.getLogger("baton.instructions.messaging")

MAX_REDIRECTS = 10


def form(ctl, message) -> dict:
    out = {k: v for k, v in ctl.params.items()
           if k not in INTERNAL_PARAMS and not k.startswith("_")
           and isinstance(v, (str, int, float, bool))}
    out.update({
        "MessageSid": message.sid, "SmsSid": message.sid, "SmsMessageSid": message.sid,
        "AccountSid": ctl.session.account, "From": message.frm, "To": message.to,
        "Body": message.body, "NumSegments": message.segments, "NumMedia": 0,
        "SmsStatus": "received", "ApiVersion": API_VERSION, "SessionSid": ctl.session.id,
    })
    return out


def _text(el) -> str:
    return "".join(el.text).strip()


async def run(shared, ctl, message) -> None:
    """Fetch and run the documents one text asks for."""
    p = ctl.params
    url, method = p.get("url", ""), str(p.get("method", "POST")).upper()
    secret, twilio = account_settings(ctl.engine, ctl.session.account)
    opts = {"secret": secret, "twilio": twilio, "timeout": float(p.get("timeout", 10)),
            "connect_timeout": float(p.get("connect_timeout", 3))}
    for _ in range(MAX_REDIRECTS):
        if not ctl.active:
            return
        try:
            if urlsplit(url).scheme not in ("http", "https"):
                raise FetchError(f"not an http(s) URL: {url!r}", 11100)
            resp = await shared.fetcher.request(url, method, form(ctl, message), **opts)
            root = _xml_tree(resp.body) if resp.body.strip() else None
        except (FetchError, DocumentError) as exc:
            log.warning("session %s: messaging document %s: %s", ctl.session.id, url, exc)
            return
        if root is None:
            return          # an empty answer: no reply (Twilio's empty 200 as well)
        if root.tag != "Response":
            log.warning("session %s: %s: the root is <%s>, not <Response>", ctl.session.id,
                        url, root.tag)
            return
        redirect = None
        for el in root.children:
            if not ctl.active:
                return
            if el.tag in ("Message", "Sms"):
                body = _text(el) or " ".join(_text(c) for c in el.children if c.tag == "Body")
                a = el.attrs
                on_status = _status_callback(shared, ctl, urljoin(url, a["action"]),
                                             a.get("method", "POST"), opts) \
                    if a.get("action") else None
                ctl.engine.messaging.send(ctl.session, body, to=a.get("to") or None,
                                          frm=a.get("from") or None, on_status=on_status)
            elif el.tag == "Redirect":
                redirect = (_text(el), el.attrs.get("method", "POST").upper())
                break
        if redirect is None:
            return
        target, method = redirect
        if target.startswith("outlet:"):
            ctl.release(target.removeprefix("outlet:"))
            ctl.engine.messaging.handoff(ctl.session, message)
            return
        url = urljoin(url, target)


def _status_callback(shared, ctl, url: str, method: str, opts: dict):
    def fire(m) -> None:
        params = {"MessageSid": m.sid, "SmsSid": m.sid, "MessageStatus": m.status,
                  "SmsStatus": m.status, "AccountSid": m.account, "From": m.frm, "To": m.to,
                  "ApiVersion": API_VERSION, "SessionSid": m.session,
                  "ErrorCode": m.sip_code if m.status in ("failed", "undelivered") else ""}
        shared.fetcher.fire(shared.fetcher.request(url, method, params, **opts))
    return fire
