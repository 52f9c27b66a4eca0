"""The REST API's texts: `POST Messages.json`, `GET Messages.json`,
`GET Messages/{Sid}.json` (docs/rest.md, docs/messaging.md).

A text is sent by `control.messages_api.send_text`, as gRPC `Messages.Send`
sends it (the same checks, the same outbound rules: a refused recipient is
403, code 21610). Its JSON has Twilio's fields; `StatusCallback` gets Twilio's
parameters (`MessageSid`, `MessageStatus`, `ErrorCode`, ...) at the text's
final status, signed like a call's callbacks (`X-Twilio-Signature` with the
account's auth_token, `X-Baton-Signature` with its secret) and retried alike.
"""
from __future__ import annotations

import re

import grpc

from control.messages_api import TextRefused, find, listing, send_text
from control.rest import (RestError, _check_url, _method, _one, _only, _paging, _time_filter,
                          bad, page_json, rfc2822)

__all__ = ["add_message_routes", "message_json", "error_code"]

_MESSAGE_SID = re.compile(r"SM[0-9a-f]{32}")
FINAL = ("sent", "delivered", "undelivered", "failed")


class _Callbacks:
    """One text's status callbacks, in order (what `RestApi.enqueue_callback` needs)."""

    def __init__(self, sid: str, account: str) -> None:
        self.sid = sid
        self.account = account
        self.queue = None
        self.sender = None


def error_code(m) -> int | None:
    """Twilio's error code of a text that did not get through (None when it did)."""
    if m.status not in ("failed", "undelivered"):
        return None
    return {403: 30007, 404: 30005, 408: 30003, 503: 30003, 416: 30005, 413: 21617,
            480: 30003, 486: 30003}.get(m.sip_code, 30008)


def message_json(api, m) -> dict:
    sid = api.account_sid(m.account)
    return {
        "sid": m.sid, "account_sid": sid, "api_version": "2010-04-01",
        "body": m.body, "from": m.frm, "to": m.to, "status": m.status,
        "direction": "inbound" if m.direction == "inbound" else "outbound-api",
        "num_segments": str(m.segments), "num_media": "0",
        "date_created": rfc2822(m.created_wall_ns), "date_updated": rfc2822(m.updated_wall_ns),
        "date_sent": rfc2822(m.updated_wall_ns) if m.status in FINAL + ("received",) else None,
        "error_code": error_code(m),
        "error_message": m.error or None, "messaging_service_sid": None,
        "price": None, "price_unit": "USD", "subresource_uris": {},
        "uri": f"{api.base(m.account)}/Messages/{m.sid}.json",
        # Baton: the conversation, the module that sent or got it, the SIP code.
        "baton_session_sid": m.session or None, "baton_module": m.module,
        "baton_sip_code": m.sip_code or None,
    }


def add_message_routes(app, api) -> None:
    """Add the Messages routes to the REST API `api` (control/rest.py) on `app`."""
    engine = api.engine

    def status_callback(url: str, method: str, account: str):
        holder = None

        def done(m) -> None:
            nonlocal holder
            holder = holder or _Callbacks(m.sid, account)
            form = {"MessageSid": m.sid, "SmsSid": m.sid, "AccountSid": api.account_sid(account),
                    "From": m.frm, "To": m.to, "MessageStatus": m.status,
                    "SmsStatus": m.status, "NumSegments": str(m.segments),
                    "ApiVersion": "2010-04-01"}
            code = error_code(m)
            if code is not None:
                form["ErrorCode"] = str(code)
            if m.sip_code:
                form["SipResponseCode"] = str(m.sip_code)
            api.enqueue_callback(holder, url, method, form, True)
        return done

    async def create(request):
        acc = await api.auth(request)
        form = await api.form_of(request)
        _only(form, {"To", "From", "Body", "StatusCallback", "StatusCallbackMethod",
                     "MessagingServiceSid", "ApplicationSid", "ValidityPeriod", "Trunk"})
        to, frm, body = _one(form, "To"), _one(form, "From"), _one(form, "Body")
        if not to:
            raise bad("To", "required", 21604)
        if not frm:
            raise bad("From", "required", 21603)
        if not body:
            raise bad("Body", "required", 21602)
        callback = None
        url = _one(form, "StatusCallback")
        if url:
            _check_url("StatusCallback", url, 21609)
            callback = status_callback(url, _method(form, "StatusCallbackMethod"), acc)
        try:
            m = send_text(engine, acc, to, frm, body, _one(form, "Trunk"), on_status=callback)
        except TextRefused as exc:
            if exc.code == grpc.StatusCode.PERMISSION_DENIED:
                raise RestError(403, 21610, str(exc)) from None
            code = {"to": 21211, "from": 21606, "body": 21617, "trunk": 21211}.get(exc.field,
                                                                                   21200)
            raise bad(exc.field.capitalize(), exc.message, code) from None
        return api.answer(message_json(api, m), 201)

    async def list_(request):
        acc = await api.auth(request)
        q = request.query
        _only(q, {"To", "From", "DateSent", "DateSent<", "DateSent>", "Page", "PageSize",
                  "PageToken", "page", "page_size"})
        page, size = _paging(request)
        bounds = [(op, _time_filter(q[name], name)) for name, op in
                  (("DateSent>", "ge"), ("DateSent<", "le"), ("DateSent", "day")) if q.get(name)]
        rows = []
        for m in listing(engine, acc, to=q.get("To", ""), frm=q.get("From", "")):
            t = m.created_wall_ns
            if all(not (op == "ge" and t < b or op == "le" and t > b or
                        op == "day" and not b <= t < b + 86_400 * 10**9) for op, b in bounds):
                rows.append(m)
        query = {k: v for k, v in q.items() if k in ("To", "From", "DateSent", "DateSent<",
                                                     "DateSent>")}
        return api.answer(page_json("messages", f"{api.base(acc)}/Messages.json", rows, page,
                                    size, query, lambda m: message_json(api, m)))

    async def fetch(request):
        acc = await api.auth(request)
        sid = request.match_info["msid"]
        m = find(engine, acc, sid) if _MESSAGE_SID.fullmatch(sid) else None
        if m is None:
            raise RestError(404, 20404, f"The requested resource Message {sid[:40]} was not found")
        return api.answer(message_json(api, m))

    a = "/2010-04-01/Accounts/{account}"
    app.router.add_post(a + "/Messages.json", create)
    app.router.add_get(a + "/Messages.json", list_)
    app.router.add_get(a + "/Messages/{msid}.json", fetch)
