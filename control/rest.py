"""The Twilio-compatible REST API, served by the engine's HTTP server.

`/2010-04-01/Accounts/{AccountSid}/...`: form-encoded requests, JSON answers with
Twilio's field names, RFC 2822 dates and Twilio's paging, so the official
`twilio` client drives Baton with only its base URL changed (docs/rest.md).

- Auth: HTTP Basic with the account's sid (`[accounts.ID] sid`, else its id)
  and `auth_token`, or with an API key's id and token (`[api_keys.ID]`,
  metered like its gRPC calls: a spent quota is 429, code 20429).
- Calls are placed by `engine.sessions.originate.Origination`, as gRPC
  `Sessions.Originate` places them; a call's sid is its session id.
  Redirects, hang-ups and the Baton extensions (`Module=`, `Node=`,
  `History.json`, `Cost.json`) run the gRPC servicers' own methods
  (`control.auth.ServicerContext`), so both APIs answer alike.
- Status callbacks: Twilio's parameters, signed with `X-Twilio-Signature`
  (the account's auth_token) and `X-Baton-Signature` (its secret), sent in
  order per call, retried with back-off.
- Errors: Twilio's JSON (`code`, `message`, `more_info`, `status`).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import os
import re
import sqlite3
import time
from collections import OrderedDict
from datetime import datetime, timezone
from urllib.parse import urlencode, urlsplit

import grpc

from control.auth import Aborted, ServicerContext
from control.billing import BillingService
from control.metering import COUNTED, ApiMeter, CountsUnavailable
from control.sessions_api import SessionsService
from engine.common import clock
from engine.media.files import find_recording
from engine.common.net import format_hostport
from engine.common.webhooks import Message, Outbox
from engine.modules.instructions.fetch import signed_headers, twilio_signature, with_query
from engine.sessions.originate import Origination, PortsExhausted, Undialable, destination
from engine.sip.uri import party
from proto import pb

log = logging.getLogger("baton.rest")

__all__ = ["RestApi", "add_routes", "MAX_BODY", "ROUTES"]

API = "/2010-04-01"
MAX_BODY = 64 * 1024          # bytes of a request body (Twiml included)
HANDLERS = 4                  # REST handlers running at once (the rest wait their turn)
MAX_CALLS = 10_000            # call records kept for Calls.json besides the engine's
MAX_RECORDINGS = 10_000
RECORD_MAX = 1800             # seconds of a Record=true recording (8 kHz, 16-bit in memory)
CALLBACK_DELAYS = (0.5, 1.0, 2.0, 4.0)   # seconds before each retry of a status callback
CALLBACK_EVENTS = ("initiated", "ringing", "answered", "completed")
MORE_INFO = "https://www.twilio.com/docs/errors/{}"
_SID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_RECORDING = re.compile(r"RE[0-9a-f]{32}")
_NUMBER = re.compile(r"\+?[0-9*#]{1,32}")

sp = pb.sessions_pb2
bp = pb.billing_pb2

# (method, path under /Accounts/{AccountSid}, summary): what the OpenAPI document lists.
ROUTES = (
    ("GET", ".json", "the account"),
    ("POST", "/Calls.json", "place a call"),
    ("GET", "/Calls.json", "list calls (To, From, Status, StartTime<, StartTime>)"),
    ("GET", "/Calls/{CallSid}.json", "fetch a call"),
    ("POST", "/Calls/{CallSid}.json", "redirect (Url, Twiml), end (Status) or hand over "
                                      "(Module, Node) a call"),
    ("DELETE", "/Calls/{CallSid}.json", "forget an ended call"),
    ("GET", "/Calls/{CallSid}/History.json", "Baton: which module held the call, when, why"),
    ("GET", "/Calls/{CallSid}/Cost.json", "Baton: the call's running cost"),
    ("GET", "/Calls/{CallSid}/Recordings.json", "the call's recordings"),
    ("GET", "/Recordings.json", "list recordings"),
    ("GET", "/Recordings/{RecordingSid}.json", "fetch a recording"),
    ("GET", "/Recordings/{RecordingSid}.wav", "a recording's audio"),
    ("DELETE", "/Recordings/{RecordingSid}.json", "delete a recording"),
    ("GET", "/Balance.json", "the account's balance"),
    ("GET", "/Usage/Records.json", "usage per module and item from the invoices (StartDate, "
                                   "EndDate, Category)"),
    ("GET", "/IncomingPhoneNumbers.json", "the account's numbers"),
    ("GET", "/Applications.json", "the config's apps"),
    ("POST", "/Messages.json", "send a text (To, From, Body, StatusCallback)"),
    ("GET", "/Messages.json", "list texts (To, From, Status, DateSent)"),
    ("GET", "/Messages/{MessageSid}.json", "fetch a text"),
)


class RestError(Exception):
    """An answer in Twilio's error format."""

    def __init__(self, status: int, code: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def bad(param: str, message: str, code: int = 21200) -> RestError:
    """HTTP 400 naming the parameter."""
    return RestError(400, code, f"{param}: {message}")


def rfc2822(wall_ns: int | None) -> str | None:
    if not wall_ns:
        return None
    return time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(wall_ns / 1e9))


class RestCall:
    """A call placed through the REST API: its status before and after the session."""

    def __init__(self, sid: str, account: str, to: str, frm: str, origination: Origination | None):
        self.sid = sid
        self.account = account
        self.to = to
        self.frm = frm
        self.origination = origination
        self.status = "queued"
        self.created_wall = clock.wall_ns()
        self.updated_wall = self.created_wall
        self.sip_status = 0
        self.callback: tuple | None = None     # (url, method, events)
        self.seq = 0
        self.queue: asyncio.Queue | None = None
        self.record = False                    # Record=true: the whole call is recorded
        self.recording = None                  # its engine.media.recording.Recording


class RestApi:
    """The REST API of one engine (its routes are added by `add_routes`)."""

    def __init__(self, engine):
        self.engine = engine
        from control.auth import Authority

        authority = Authority(engine.cfg)
        self.sessions = SessionsService(engine, authority, None)
        self.billing = BillingService(engine, authority, self.sessions)
        if getattr(engine, "accountant_client", None) is None:
            from engine.accounting.client import BillingClient

            engine.accountant_client = BillingClient(engine)
        self.meter = ApiMeter.shared(engine)
        self.calls: OrderedDict[str, RestCall] = OrderedDict()
        self.deleted: set[str] = set()
        self.recordings: OrderedDict[str, dict] = OrderedDict()
        self.tasks: set[asyncio.Task] = set()
        self.http = None
        self._client = None          # aiohttp client of the cluster's other nodes
        self.callbacks_sent = 0
        self.callbacks_failed = 0
        accounts = engine.cfg.raw.get("accounts", {}) or {}
        # sid -> account id; account id -> (sid, auth_token, secret)
        self.by_sid: dict[str, str] = {}
        self.creds: dict[str, tuple[str, str | None, str | None]] = {}
        for acc_id in engine.cfg.accounts:
            raw = accounts.get(acc_id, {}) if isinstance(accounts.get(acc_id), dict) else {}
            sid = raw.get("sid") or acc_id
            self.by_sid[sid] = acc_id
            self.by_sid.setdefault(acc_id, acc_id)
            self.creds[acc_id] = (sid, raw.get("auth_token"), raw.get("secret"))
        engine.listeners.append(self._on_event)
        self.outbox = callback_outbox(engine.cfg.data_dir)
        self._resume_callbacks()

    # -- auth -------------------------------------------------------------------------
    async def authenticate(self, request, url_sid: str) -> str:
        """The account the request acts for; RestError 401/404/429 otherwise."""
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        user = password = None
        if scheme.lower() == "basic" and value:
            try:
                user, sep, password = base64.b64decode(value.strip(), validate=True) \
                    .decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                user = None
            if user is not None and not sep:
                user = None
        if user is None:
            raise _unauthorized("Authenticate: HTTP Basic credentials are required")
        account = None
        acc_id = self.by_sid.get(user)
        if acc_id is not None:
            token = self.creds[acc_id][1]
            if token and hmac.compare_digest(token.encode(), password.encode("utf-8", "replace")):
                account = acc_id
        if account is None:
            key = self.meter.key_for_token(password)
            if key is not None and hmac.compare_digest(key.id.encode(), user.encode("utf-8", "replace")):
                account = key.account
                if await self.meter.forwarded_counted(request.headers.get(COUNTED)):
                    refusal = None           # counted by the node that forwarded it
                else:
                    refusal = await self._count(key, request)
                if refusal is not None:
                    raise RestError(429, 20429, refusal)
        if account is None:
            raise _unauthorized("Authenticate: the credentials are not valid")
        if self.by_sid.get(url_sid) != account:
            # Another account's resources are not there, for this caller.
            raise RestError(404, 20404, f"The requested resource {request.path} was not found")
        return account

    async def _count(self, key, request) -> str | None:
        """Count an API key's request (None: it may proceed; else the refusal)."""
        try:
            return await self.meter.admit_async(
                key, "REST " + request.method + " " + request.path[:100])
        except (sqlite3.Error, CountsUnavailable):
            # The count cannot be kept: refuse rather than serve unmetered.
            raise RestError(503, 20503, "API usage cannot be recorded; retry later") from None

    def account_sid(self, account: str) -> str:
        return self.creds[account][0]

    def base(self, account: str) -> str:
        return f"{API}/Accounts/{self.account_sid(account)}"

    # -- calls ------------------------------------------------------------------------
    def _destination(self, account: str, to: str, trunk: str) -> tuple[str, dict, object]:
        """`originate.destination` (as `Dial` reaches `To`), its refusals in Twilio's
        codes: 400/21211 malformed, 403/21215 not permitted, 400/21217 not
        registered."""
        try:
            return destination(self.engine, account, to, trunk, ("To", "Trunk"))
        except Undialable as exc:
            status, code = {"denied": (403, 21215),
                            "unregistered": (400, 21217)}.get(exc.kind, (400, 21211))
            raise RestError(status, code, f"{exc.field}: {exc.message}") from None

    async def create_call(self, account: str, form) -> RestCall:
        engine = self.engine
        allowed = {"To", "From", "Url", "Method", "Twiml", "ApplicationSid", "FallbackUrl",
                   "FallbackMethod", "StatusCallback", "StatusCallbackEvent",
                   "StatusCallbackMethod", "Timeout", "Record", "CallerId", "Trunk"}
        _only(form, allowed)
        to = _one(form, "To")
        if not to:
            raise bad("To", "required", 21201)
        frm = _one(form, "From") or _one(form, "CallerId")
        if not frm:
            raise bad("From", "required", 21213)
        if frm.lower().startswith(("sip:", "sips:")):
            from engine.sip.uri import from_address

            try:
                from_uri = from_address(frm)
            except ValueError as exc:
                raise bad("From", f"{frm[:60]!r} is not a SIP URI ({exc})", 21212) from None
        elif _NUMBER.fullmatch(frm) or re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", frm):
            from_uri = f"<sip:{frm}@{format_hostport(engine.cfg.advertise, engine.sip_port)}>"
        else:
            raise bad("From", f"{frm[:60]!r} is not a phone number or SIP URI", 21212)
        url, twiml, app_sid = _one(form, "Url"), _one(form, "Twiml"), _one(form, "ApplicationSid")
        given = [k for k, v in (("Url", url), ("Twiml", twiml), ("ApplicationSid", app_sid)) if v]
        if len(given) != 1:
            raise bad("Url", "exactly one of Url, Twiml or ApplicationSid is required"
                      + (f" (got {', '.join(given)})" if given else ""), 21205)
        method = _method(form, "Method")
        params: dict = {}
        app = None
        target = "baton.instructions"
        if url:
            _check_url("Url", url, 21205)
            params.update(url=url, method=method)
        elif twiml:
            params["twiml"] = twiml
        else:
            app = engine.cfg.apps.get(app_sid)
            if app is None:
                raise bad("ApplicationSid", f"no application {app_sid[:60]!r}", 21218)
            target = app_sid
        fallback = _one(form, "FallbackUrl")
        if fallback:
            _check_url("FallbackUrl", fallback, 21206)
            params.update(fallback_url=fallback, fallback_method=_method(form, "FallbackMethod"))
        timeout = _number(form, "Timeout", 60, 1, 600, 21216)
        callback = _one(form, "StatusCallback")
        events = form.getall("StatusCallbackEvent", [])
        events = [e for v in events for e in v.replace(",", " ").split()]
        for e in events:
            if e not in CALLBACK_EVENTS:
                raise bad("StatusCallbackEvent", f"{e[:30]!r} is not one of "
                          f"{', '.join(CALLBACK_EVENTS)}", 21626)
        if callback:
            _check_url("StatusCallback", callback, 21609)
        cb_method = _method(form, "StatusCallbackMethod")
        record = _one(form, "Record").lower()
        if record not in ("", "false", "true"):
            raise bad("Record", f"{record[:20]!r} is not true or false", 21229)
        trunk = _one(form, "Trunk")
        if trunk and not _SID.fullmatch(trunk):
            raise bad("Trunk", f"{trunk[:60]!r} is not a trunk name", 21211)
        to_uri, route, grant = self._destination(account, to, trunk)
        rc: RestCall | None = None

        def progress(step: str) -> None:
            if rc is not None:
                self._progress(rc, step)

        o = Origination(engine, account, to_uri, party(to_uri), from_uri, target, app, params,
                        float(timeout), grant, progress, route)
        rc = RestCall(o.session.id, account, party(to), party(from_uri), o)
        rc.record = record == "true"
        if callback:
            rc.callback = (callback, cb_method, set(events or ["completed"]))
        self._keep(rc)
        self._callback(rc, "initiated")
        task = engine.loop.create_task(self._place(rc))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return rc

    async def _place(self, rc: RestCall) -> None:
        try:
            outcome, status = await rc.origination.run()
        except PortsExhausted:
            outcome, status = "failed", 503
        except Exception:
            log.exception("call %s: placing it failed", rc.sid)
            outcome, status = "failed", 500
        rc.sip_status = status
        if outcome != "answered" and rc.status not in CALL_FINAL:
            self._progress(rc, outcome)

    def _keep(self, rc: RestCall) -> None:
        self.calls[rc.sid] = rc
        while len(self.calls) > MAX_CALLS:
            self.calls.popitem(last=False)

    def _progress(self, rc: RestCall, step: str) -> None:
        """A step of a REST call: its status and its callback."""
        status = {"answered": "in-progress"}.get(step, step)
        if rc.status == status or rc.status in CALL_FINAL:
            return
        rc.status = status
        rc.updated_wall = clock.wall_ns()
        if step == "ringing":
            self._callback(rc, "ringing")
        elif step == "answered":
            if rc.record:
                self._record_call(rc)
            self._callback(rc, "answered")
        else:
            self._callback(rc, "completed")

    def _on_event(self, session, event: str, detail: dict) -> None:
        """Ends and recordings of REST calls (not session.started / session.ended)."""
        if event == "ended":
            rc = self.calls.get(session.id)
            if rc is not None:
                if rc.recording is not None:
                    rc.recording.stop("hangup")
                self._progress(rc, "completed")
        elif event == "recording" and detail.get("sid"):
            self._add_recording(detail["sid"], session.id, session.account,
                                detail.get("duration") or 0, "RecordVerb")

    _on_event.session_events = False    # engine/common/webhooks.py EngineHooks

    def _add_recording(self, sid: str, call: str, account: str, duration: float,
                       source: str) -> None:
        self.recordings[sid] = {"sid": sid, "call_sid": call, "account": account,
                                "duration": duration, "wall_ns": clock.wall_ns(),
                                "source": source}
        while len(self.recordings) > MAX_RECORDINGS:
            self.recordings.popitem(last=False)

    def _record_call(self, rc: RestCall) -> None:
        """Record=true: the engine's recorder on the answered leg, from the answer
        to the hang-up (what the called party sends, 8 kHz mono WAV, at most
        RECORD_MAX seconds); it is one of the call's Recordings once written."""
        from engine.media.files import recording_path
        from engine.media.recording import Recording

        session = rc.origination.session
        if not session.legs:
            return
        path = recording_path(self.engine.cfg.data_dir, rc.account)
        sid = os.path.basename(path)[:-4]

        def written(result: dict) -> None:
            if result["reason"] != "write-failed":
                self._add_recording(sid, rc.sid, rc.account, result["duration"], "OutboundAPI")

        rc.recording = Recording(session.legs[0], path, max_length=RECORD_MAX, silence=0,
                                 finish_on_key="", beep=False, on_done=written)
        rc.recording.start()

    def find(self, account: str, sid: str):
        """(RestCall or None, Session or None) of the account's call `sid`; 404 otherwise."""
        if sid in self.deleted:
            raise _call_not_found(sid)
        rc = self.calls.get(sid)
        session = self.engine.find_session(sid)
        if rc is not None and rc.account != account:
            rc = None
        if session is not None and session.account != account:
            session = None
        if session is None and rc is not None and rc.origination is not None \
                and rc.status not in CALL_FINAL:
            session = rc.origination.session
        if rc is None and session is None:
            raise _call_not_found(sid)
        return rc, session

    @staticmethod
    def status_of(rc: RestCall | None, session) -> str:
        if rc is not None and (rc.status != "in-progress" and rc.status != "completed"
                               or session is None):
            return rc.status
        return "completed" if session.ended else "in-progress"

    def call_json(self, account: str, rc: RestCall | None, session) -> dict:
        sid = rc.sid if rc is not None else session.id
        status = self.status_of(rc, session)
        answered = session is not None and status in ("in-progress", "completed")
        start = session.started_wall if answered else None
        end = session.ended_wall if answered and session.ended else \
            (rc.updated_wall if rc is not None and status in CALL_FINAL else None)
        duration = None
        if start and end:
            duration = str(max(0, round((end - start) / 1e9)))
        elif status in CALL_FINAL:
            duration = "0"
        if session is not None:
            to, frm = session.number or party(session.to_uri), party(session.from_uri)
            direction = "inbound" if session.direction == "inbound" else "outbound-api"
            created = rc.created_wall if rc is not None else session.started_wall
        else:
            to, frm, direction, created = rc.to, rc.frm, "outbound-api", rc.created_wall
        if rc is not None:
            to, frm = rc.to, rc.frm
        base = f"{self.base(account)}/Calls/{sid}"
        return {
            "sid": sid, "account_sid": self.account_sid(account), "parent_call_sid": None,
            "date_created": rfc2822(created),
            "date_updated": rfc2822(rc.updated_wall if rc is not None else
                                    (session.ended_wall or session.started_wall)),
            "to": to, "to_formatted": to, "from": frm, "from_formatted": frm,
            "phone_number_sid": None, "status": status, "start_time": rfc2822(start),
            "end_time": rfc2822(end), "duration": duration, "price": None, "price_unit": "USD",
            "direction": direction, "answered_by": None, "api_version": "2010-04-01",
            "forwarded_from": None, "group_sid": None, "caller_name": None, "queue_time": "0",
            "trunk_sid": None, "uri": base + ".json",
            "subresource_uris": {"recordings": base + "/Recordings.json",
                                 "history": base + "/History.json",
                                 "cost": base + "/Cost.json"},
            # Baton: the module in control now (empty once ended).
            "module": (session.module.code if session is not None and not session.ended
                       and session.module is not None else None),
        }

    def all_calls(self, account: str) -> list[tuple[int, str, RestCall | None, object]]:
        """(created, sid, RestCall, Session) of the account's known calls, newest first."""
        engine = self.engine
        seen: dict[str, tuple] = {}
        for s in list(engine.finished) + list(engine.sessions.values()):
            if s.account == account and s.id not in self.deleted:
                seen[s.id] = (s.started_wall, s.id, None, s)
        for rc in self.calls.values():
            if rc.account != account or rc.sid in self.deleted:
                continue
            s = seen.get(rc.sid, (0, 0, 0, None))[3]
            if s is None and rc.status not in CALL_FINAL and rc.origination is not None:
                s = rc.origination.session
            seen[rc.sid] = (rc.created_wall, rc.sid, rc, s)
        return sorted(seen.values(), key=lambda t: (t[0], t[1]), reverse=True)

    async def update_call(self, account: str, sid: str, form) -> dict:
        _only(form, {"Url", "Method", "Twiml", "Status", "FallbackUrl", "FallbackMethod",
                     "StatusCallback", "StatusCallbackMethod", "Module", "Node"})
        rc, session = self.find(account, sid)
        status = _one(form, "Status")
        url, twiml = _one(form, "Url"), _one(form, "Twiml")
        module, node = _one(form, "Module"), _one(form, "Node")
        given = [k for k, v in (("Url", url), ("Twiml", twiml), ("Status", status),
                                ("Module", module), ("Node", node)) if v]
        if len(given) != 1:
            raise bad("Url", "exactly one of Url, Twiml, Status, Module or Node is required"
                      + (f" (got {', '.join(given)})" if given else ""), 21205)
        live = session is not None and self.engine.sessions.get(session.id) is session
        if status:
            if status not in ("canceled", "completed"):
                raise bad("Status", f"{status[:30]!r} is not canceled or completed", 21220)
            if rc is not None and rc.status in ("queued", "ringing"):
                rc.origination.cancel()
                self._progress(rc, "canceled")
            elif live and status == "completed":
                await self._transition(account, sid, "hangup", {})
            return self.call_json(account, rc, session)
        if not live:
            raise RestError(400, 21220, f"Call {sid} is not in-progress. Cannot redirect.")
        if url:
            _check_url("Url", url, 21205)
            target, params = "baton.instructions", {"url": url, "method": _method(form, "Method")}
            fb = _one(form, "FallbackUrl")
            if fb:
                _check_url("FallbackUrl", fb, 21206)
                params.update(fallback_url=fb, fallback_method=_method(form, "FallbackMethod"))
        elif twiml:
            target, params = "baton.instructions", {"twiml": twiml}
        elif module:
            if not re.fullmatch(r"[a-z0-9_-]+(\.[a-z0-9_-]+)+", module):
                raise bad("Module", f"{module[:60]!r} is not a module code such as acme.survey")
            target, params = "module:" + module, {}
        else:
            if session.app is None or node not in session.app.nodes:
                raise bad("Node", f"{node[:60]!r} is not a node of the call's app")
            target, params = node, {}
        await self._transition(account, sid, target, params)
        return self.call_json(account, rc, session)

    async def _transition(self, account: str, sid: str, target: str, params: dict) -> None:
        """gRPC `Sessions.Transition`, run for this account: the policy decides."""
        req = sp.TransitionRequest(session_id=sid, target=target, params=pb.to_struct(params))
        await _servicer(self.sessions.Transition, req, account)

    async def history(self, account: str, sid: str) -> dict:
        self.find(account, sid)
        h = await _servicer(self.sessions.History, sp.HistoryRequest(session_id=sid), account)
        return {"call_sid": sid, "account_sid": self.account_sid(account), "live": h.live,
                "end_reason": h.end_reason or None,
                "history": [{"module": s.module, "level": s.level, "node": s.node or None,
                             "reason": s.reason, "start_time": rfc2822(s.start_wall_ns),
                             "end_time": rfc2822(s.end_wall_ns), "end_reason": s.end_reason or None,
                             "duration_ms": s.duration_ns // 1_000_000 if s.duration_ns else None}
                            for s in h.spans],
                "uri": f"{self.base(account)}/Calls/{sid}/History.json"}

    async def cost(self, account: str, sid: str) -> dict:
        self.find(account, sid)
        c = await _servicer(self.sessions.Cost, sp.CostRequest(session_id=sid), account)
        return {"call_sid": sid, "account_sid": self.account_sid(account), "live": c.live,
                "price": c.amount_decimal, "price_unit": c.currency,
                "uri": f"{self.base(account)}/Calls/{sid}/Cost.json"}

    async def balance(self, account: str) -> dict:
        b = await _servicer(self.billing.Balance, bp.BalanceRequest(account=account), account)
        return {"account_sid": self.account_sid(account), "balance": b.balance.amount,
                "currency": b.balance.currency}

    async def usage(self, account: str, start: str, end: str, category: str) -> list[dict]:
        """Usage records: one per (period, module, level, item) of the account's invoices,
        as the accountant rated them (gRPC `Billing.Invoice`)."""
        from engine.accounting.config import PeriodClock

        kind = (self.engine.cfg.raw.get("billing", {}) or {}).get("period", "month")
        periods = PeriodClock(kind if kind in ("month", "day") else "month")
        now = clock.wall_ns()
        lo = _time_filter(start, "StartDate") if start else now
        hi = _time_filter(end, "EndDate") if end else lo
        if hi < lo:
            raise bad("EndDate", "before StartDate", 20001)
        labels: list[str] = []
        t = lo
        while t <= hi:
            label = periods.of(t)
            if not labels or labels[-1] != label:
                labels.append(label)
            if len(labels) > 62:
                raise bad("StartDate", "at most 62 billing periods at once", 20001)
            t += 86_400 * 10**9
        out = []
        for label in labels:
            inv = await _servicer(self.billing.Invoice, bp.InvoiceRequest(account=account,
                                                                          period=label), account)
            for line in inv.lines:
                cat = usage_category(line.module, line.level, line.item)
                if category and category not in (cat, line.module, line.level):
                    continue
                level = f" at {line.level} level" if line.level else ""
                out.append({"account_sid": self.account_sid(account), "category": cat,
                            "description": f"{line.module}: {line.item}{level} ({line.plan})",
                            "baton_module": line.module, "baton_level": line.level or None,
                            "baton_item": line.item,
                            "start_date": label, "end_date": label, "count": str(line.transactions),
                            "count_unit": "transactions", "usage": line.quantity,
                            "usage_unit": line.unit, "price": line.amount.amount,
                            "price_unit": line.amount.currency, "api_version": "2010-04-01",
                            "as_of": rfc2822(now),
                            "uri": f"{self.base(account)}/Usage/Records.json?Category={cat}"})
        return out

    # -- recordings -------------------------------------------------------------------
    def recording_json(self, account: str, r: dict) -> dict:
        base = f"{self.base(account)}/Recordings/{r['sid']}"
        return {"sid": r["sid"], "account_sid": self.account_sid(account),
                "call_sid": r["call_sid"], "date_created": rfc2822(r["wall_ns"]),
                "date_updated": rfc2822(r["wall_ns"]), "start_time": rfc2822(r["wall_ns"]),
                "duration": str(int(round(r["duration"]))), "channels": 1,
                "source": r.get("source", "RecordVerb"),
                "status": "completed", "price": None, "price_unit": "USD",
                "api_version": "2010-04-01", "uri": base + ".json",
                "media_url": f"{self.http_base()}{base}.wav" if self.http_base() else None}

    def http_base(self) -> str:
        return self.http.url if self.http is not None else ""

    def recording(self, account: str, sid: str) -> tuple[dict, str]:
        r = self.recordings.get(sid)
        path = (find_recording(self.engine.cfg.data_dir, sid, account)
                if r is not None and r["account"] == account else None)
        if path is None:
            raise RestError(404, 20404, f"The requested resource Recording {sid} was not found")
        return r, path

    # -- status callbacks -------------------------------------------------------------
    def _callback(self, rc: RestCall, event: str) -> None:
        if rc.callback is None or event not in rc.callback[2]:
            return
        url, method, _ = rc.callback
        rc.seq += 1
        session = rc.origination.session if rc.origination is not None else None
        status = {"initiated": "initiated"}.get(event, rc.status)
        form = {"CallSid": rc.sid, "AccountSid": self.account_sid(rc.account),
                "From": rc.frm, "To": rc.to, "Caller": rc.frm, "Called": rc.to,
                "CallStatus": status, "Direction": "outbound-api", "ApiVersion": "2010-04-01",
                "Timestamp": rfc2822(clock.wall_ns()), "SequenceNumber": str(rc.seq - 1),
                "CallbackSource": "call-progress-events"}
        if event == "completed":
            dur = 0
            if session is not None and session.ended_wall and rc.status == "completed":
                dur = max(0, round((session.ended_wall - session.started_wall) / 1e9))
            form["CallDuration"] = form["Duration"] = str(dur)
            if rc.sip_status:
                form["SipResponseCode"] = str(rc.sip_status)
        self.enqueue_callback(rc, url, method, form, event == "completed")

    def enqueue_callback(self, rc, url: str, method: str, form: dict, last: bool) -> None:
        """Send `form` to `url` after `rc`'s earlier callbacks (`rc`: a RestCall, or
        anything with its `sid`, `account` and `queue`); `last` ends them. Stored before
        it is sent, deleted once answered 2xx: a callback pending when the engine stops
        is sent when it starts again (`_resume_callbacks`)."""
        msg_id = f"{rc.sid}:{max(0, getattr(rc, 'seq', 1) - 1):06d}"
        body = json.dumps({"call": rc.sid, "method": method, "form": form, "last": last})
        if not self.outbox.exists():
            # Created private before SQLite opens it (its -wal and -shm files follow).
            os.makedirs(os.path.dirname(self.outbox.path), mode=0o700, exist_ok=True)
            os.close(os.open(self.outbox.path, os.O_CREAT | os.O_RDWR, 0o600))
        self.outbox.add(Message(msg_id, "call.status", rc.account, url, "", body.encode()),
                        time.time())
        if rc.queue is None:
            rc.queue = self._callback_sender(rc.account, rc.sid)
        rc.queue.put_nowait((msg_id, url, method, form, last))

    def _callback_sender(self, account: str, sid: str) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        sender = self.engine.loop.create_task(self._send_callbacks(account, sid, queue))
        self.tasks.add(sender)
        sender.add_done_callback(self.tasks.discard)
        return queue

    def _resume_callbacks(self) -> None:
        """The status callbacks a previous run left undelivered, each call's in order."""
        if not self.outbox.exists():
            return
        queues: dict[str, asyncio.Queue] = {}
        for m in sorted(self.outbox.due(float("inf"), MAX_CALLS * 8), key=lambda m: m.id):
            try:
                d = json.loads(m.body)
                call, method, form, last = d["call"], d["method"], d["form"], d["last"]
            except (ValueError, KeyError, TypeError):
                log.warning("status callback %s: unreadable, dropped", m.id)
                self.outbox.delivered(m.id)
                continue
            if m.account not in self.creds:
                log.warning("status callback %s: account %s is gone, dropped", m.id, m.account)
                self.outbox.delivered(m.id)
                continue
            if call not in queues:
                queues[call] = self._callback_sender(m.account, call)
            queues[call].put_nowait((m.id, m.url, method, form, last))
        if queues:
            log.info("resuming the status callbacks of %d calls", len(queues))

    async def _send_callbacks(self, account: str, sid: str, queue: asyncio.Queue) -> None:
        """One call's callbacks, one at a time in order, each retried with back-off."""
        import aiohttp

        _, token, secret = self.creds[account]
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            while True:
                msg_id, url, method, form, last = await queue.get()
                target = with_query(url, form) if method == "GET" else url
                body = {} if method == "GET" else form
                for attempt in range(len(CALLBACK_DELAYS) + 1):
                    headers = signed_headers(target, body, secret, False)
                    if token:
                        headers["X-Twilio-Signature"] = twilio_signature(token, target, body)
                    try:
                        async with http.request(method, target, data=body or None,
                                                headers=headers, allow_redirects=False) as resp:
                            await resp.read()
                            if 200 <= resp.status < 300:
                                self.callbacks_sent += 1
                                self.outbox.delivered(msg_id)
                                break
                            error = f"HTTP {resp.status}"
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        error = f"{type(exc).__name__}: {exc}"
                    if attempt == len(CALLBACK_DELAYS):
                        self.callbacks_failed += 1
                        log.warning("%s: status callback to %s failed %d times: %s",
                                    sid, url, attempt + 1, error)
                        # Kept in the outbox as failed, not sent again.
                        self.outbox.retry(Message(msg_id, "call.status", account, url, "", b"",
                                                  attempt + 1), error, None)
                        break
                    await asyncio.sleep(CALLBACK_DELAYS[attempt])
                if last:
                    return

    async def elsewhere(self, request, sid: str):
        """The owner node's answer to this request about call `sid` when another node of
        the cluster holds it (docs/cluster.md), sent with the caller's own credentials so
        the owner checks them as if asked directly; None when no other node does."""
        import aiohttp
        from aiohttp import web

        from control.forward import FORWARDED
        from engine.sessions.directory import DirectoryUnavailable

        directory = self.engine.directory
        if directory is None or FORWARDED in request.headers:
            return None                      # one hop only: the directory was stale
        try:
            owner = await directory.owner(sid)
        except DirectoryUnavailable as exc:
            raise RestError(503, 20503, f"Call {sid} is not on this node and the cluster's "
                                        f"session directory cannot be reached ({exc})") from None
        node = self.engine.cfg.node_id
        if owner is None or owner.node == node:
            return None
        if not self.engine.cfg.cluster.forward or not owner.http:
            raise RestError(409, 20409, f"Call {sid} lives on node {owner.node!r} (REST "
                                        f"{owner.http or 'not served'}); ask that node")
        headers = {k: request.headers[k] for k in ("Authorization", "Content-Type", "Accept")
                   if k in request.headers}
        headers[FORWARDED] = node
        # An API key's request was counted here: the owner must not count it again.
        ticket = await self.meter.ticket_for(_basic_password(request))
        if ticket is not None:
            headers[COUNTED] = ticket
        if self._client is None:
            self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        try:
            async with self._client.request(request.method, f"http://{owner.http}{request.rel_url}",
                                            data=await request.read(), headers=headers,
                                            allow_redirects=False) as r:
                body = await r.read()
                return web.Response(status=r.status, body=body, content_type=r.content_type,
                                    headers={FORWARDED: owner.node})
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise RestError(503, 20503, f"Call {sid} lives on node {owner.node!r} "
                                        f"({owner.http}), which did not answer: "
                                        f"{exc or type(exc).__name__}") from None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
        if self._on_event in self.engine.listeners:
            self.engine.listeners.remove(self._on_event)
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.outbox.close()


CALL_FINAL = ("completed", "busy", "no-answer", "failed", "canceled")


def callback_outbox(data_dir: str) -> Outbox:
    """The status callbacks not delivered yet: `DATA/rest/callbacks.db` (0600, in a
    0700 directory; no secrets in it: signatures are made when sent)."""
    return Outbox(os.path.join(data_dir, "rest", "callbacks.db"))


def usage_category(module: str, level: str, item: str) -> str:
    """A usage record's category, the seed's view of usage: time in control per
    module and level (`baton.bridge/basic`, `acme.survey/service`), counted actions
    per module and item (`baton.api.KEY/api_call`)."""
    if item == "time" and level:
        return f"{module}/{level}"
    return f"{module}/{item}"


def _basic_password(request) -> str | None:
    """The password of a request's HTTP Basic credentials, if it has some."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        return base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
    except (binascii.Error, UnicodeDecodeError):
        return None


def _unauthorized(message: str) -> RestError:
    return RestError(401, 20003, message, {"WWW-Authenticate": 'Basic realm="Baton API"'})


def _call_not_found(sid: str) -> RestError:
    return RestError(404, 20404, f"The requested resource Call {sid} was not found")


async def _servicer(method, request, account: str):
    """Run a gRPC servicer method for `account`; its abort becomes a RestError."""
    try:
        return await method(request, ServicerContext(account))
    except Aborted as exc:
        status, code = _GRPC_TO_HTTP.get(exc.code, (500, 20500))
        raise RestError(status, code, exc.details) from None


_GRPC_TO_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, 21200),
    grpc.StatusCode.NOT_FOUND: (404, 20404),
    grpc.StatusCode.PERMISSION_DENIED: (403, 20403),
    grpc.StatusCode.FAILED_PRECONDITION: (409, 20409),
    grpc.StatusCode.UNAUTHENTICATED: (401, 20003),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, 20429),
    grpc.StatusCode.UNAVAILABLE: (503, 20503),
}


# -- parameters ------------------------------------------------------------------------

def _only(form, allowed: set) -> None:
    for k in form.keys():
        if k not in allowed:
            raise RestError(400, 20001, f"{k[:60]}: unknown parameter (known: "
                                        f"{', '.join(sorted(allowed))})")


def _one(form, name: str) -> str:
    values = form.getall(name, [])
    if len(values) > 1:
        raise bad(name, "given more than once")
    v = values[0] if values else ""
    if not isinstance(v, str):
        raise bad(name, "a form value, not a file")
    return v.strip()


def _method(form, name: str) -> str:
    m = (_one(form, name) or "POST").upper()
    if m not in ("GET", "POST"):
        raise bad(name, f"{m[:20]!r} is not GET or POST", 21207)
    return m


def _number(form, name: str, default: int, lo: int, hi: int, code: int) -> int:
    v = _one(form, name)
    if not v:
        return default
    try:
        n = int(v)
    except ValueError:
        raise bad(name, f"{v[:20]!r} is not a whole number", code) from None
    if not lo <= n <= hi:
        raise bad(name, f"between {lo} and {hi}", code)
    return n


def _check_url(name: str, url: str, code: int) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or len(url) > 2048 \
            or any(c in url for c in "\r\n "):
        raise bad(name, f"{url[:60]!r} is not an http(s) URL", code)


def _time_filter(value: str, name: str) -> int:
    """A StartTime filter (YYYY-MM-DD or ISO 8601) as wall ns."""
    try:
        if len(value) == 10:
            dt = datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=timezone.utc)
        else:
            dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=timezone.utc)
    except ValueError:
        raise bad(name, f"{value[:30]!r} is not a date (YYYY-MM-DD) or an ISO 8601 time",
                  20001) from None
    return int(dt.timestamp() * 1e9)


def _paging(request) -> tuple[int, int]:
    q = request.query
    try:
        size = int(q.get("PageSize", q.get("page_size", "50")))
        page = int(q.get("Page", q.get("page", "0")))
    except ValueError:
        raise bad("PageSize", "Page and PageSize are whole numbers", 20001) from None
    if not 1 <= size <= 1000:
        raise bad("PageSize", "between 1 and 1000", 20001)
    if page < 0:
        raise bad("Page", "0 or more", 20001)
    return page, size


def page_json(key: str, uri: str, items: list, page: int, size: int, query: dict,
              build=None) -> dict:
    """One page of `items` (all of them, already filtered) in Twilio's shape;
    `build` turns each item of the page into its JSON."""
    total = len(items)
    chunk = items[page * size:(page + 1) * size]
    if build is not None:
        chunk = [build(i) for i in chunk]

    def link(p: int) -> str:
        return uri + "?" + urlencode({**query, "PageSize": size, "Page": p})

    last = max(0, (total - 1) // size)
    return {key: chunk, "page": page, "page_size": size, "start": page * size,
            "end": page * size + max(0, len(chunk) - 1), "uri": link(page),
            "first_page_uri": link(0),
            "next_page_uri": link(page + 1) if page < last else None,
            "previous_page_uri": link(page - 1) if page > 0 else None}


# -- the routes ------------------------------------------------------------------------

def add_routes(app, engine) -> RestApi:
    """Add the REST API's routes to the aiohttp `app` of the engine's HTTP server."""
    from aiohttp import web

    api = RestApi(engine)

    def answer(data: dict, status: int = 200) -> web.Response:
        return web.json_response(data, status=status, dumps=_dumps)

    # The media clock shares this loop: a burst of requests runs a few handlers at a
    # time, so no loop iteration runs them all and a 20 ms tick always gets its turn.
    running = asyncio.Semaphore(HANDLERS)

    @web.middleware
    async def errors(request, handler):
        if not request.path.startswith(API):
            return await handler(request)
        try:
            if request.content_length is not None and request.content_length > MAX_BODY:
                raise RestError(413, 20413, f"the request body is more than {MAX_BODY} bytes")
            async with running:
                # Yield once holding a place: handlers that never await would
                # otherwise all run in the loop iteration that received them.
                await asyncio.sleep(0)
                try:
                    return await handler(request)
                except RestError as exc:
                    # A call another node of the cluster holds: that node answers.
                    sid = request.match_info.get("sid")
                    fwd = await api.elsewhere(request, sid) if exc.status == 404 and sid \
                        and request.path.startswith(f"{API}/Accounts/") and "/Calls/" in \
                        request.path else None
                    if fwd is None:
                        raise
                    return fwd
        except RestError as exc:
            return failure(exc.status, exc.code, exc.message, exc.headers)
        except web.HTTPRequestEntityTooLarge:
            return failure(413, 20413, f"the request body is more than {MAX_BODY} bytes")
        except web.HTTPException as exc:
            return failure(exc.status, 20000 + exc.status, exc.reason)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("REST %s %s failed", request.method, request.path[:200])
            return failure(500, 20500, "internal error")

    def failure(status: int, code: int, message: str, headers=None) -> web.Response:
        """Twilio's error body."""
        return web.json_response({"code": code, "message": message,
                                  "more_info": MORE_INFO.format(code), "status": status},
                                 status=status, headers=headers, dumps=_dumps)

    app.middlewares.append(errors)

    async def form_of(request):
        if request.content_type not in ("application/x-www-form-urlencoded", "multipart/form-data",
                                        "application/octet-stream", ""):
            raise RestError(415, 20415, f"{request.content_type}: send "
                                        "application/x-www-form-urlencoded")
        return await request.post()

    async def auth(request) -> str:
        sid = request.match_info["account"]
        if not _SID.fullmatch(sid):
            raise RestError(404, 20404, "The requested resource was not found")
        return await api.authenticate(request, sid)

    # What the routes of other resources' files (control/rest_messages.py) answer with.
    api.auth, api.form_of, api.answer = auth, form_of, answer

    async def account(request):
        acc = await auth(request)
        a = engine.cfg.accounts[acc]
        return answer({"sid": api.account_sid(acc), "friendly_name": a.name or acc,
                       "status": "active", "type": "Full", "owner_account_sid": api.account_sid(acc),
                       "uri": api.base(acc) + ".json"})

    async def calls_create(request):
        acc = await auth(request)
        rc = await api.create_call(acc, await form_of(request))
        return answer(api.call_json(acc, rc, None), 201)

    async def calls_list(request):
        acc = await auth(request)
        q = request.query
        known = {"To", "From", "Status", "StartTime", "StartTime<", "StartTime>", "Page",
                 "PageSize", "PageToken", "page", "page_size", "ParentCallSid", "EndTime",
                 "EndTime<", "EndTime>"}
        _only(q, known)
        page, size = _paging(request)
        to, frm, status = q.get("To"), q.get("From"), q.get("Status")
        bounds = []
        for name, op in (("StartTime>", "ge"), ("StartTime<", "le"), ("StartTime", "day")):
            if q.get(name):
                bounds.append((op, _time_filter(q[name], name)))
        out = []
        for created, sid, rc, session in api.all_calls(acc):
            # Filter on what is cheap to know; JSON is built for the page only.
            if status and api.status_of(rc, session) != status:
                continue
            if to or frm:
                c_to, c_from = (rc.to, rc.frm) if rc is not None else \
                    (session.number or party(session.to_uri), party(session.from_uri))
                if (to and c_to != to) or (frm and c_from != frm):
                    continue
            ok = True
            for op, t in bounds:
                if op == "ge" and created < t or op == "le" and created > t or \
                        op == "day" and not t <= created < t + 86_400 * 10**9:
                    ok = False
            if ok:
                out.append((rc, session))
        query = {k: v for k, v in q.items() if k not in ("Page", "PageSize", "PageToken",
                                                          "page", "page_size")}
        return answer(page_json("calls", f"{api.base(acc)}/Calls.json", out, page, size, query,
                                lambda t: api.call_json(acc, *t)))

    async def call_fetch(request):
        acc = await auth(request)
        rc, session = api.find(acc, request.match_info["sid"])
        return answer(api.call_json(acc, rc, session))

    async def call_update(request):
        acc = await auth(request)
        form = await form_of(request)
        return answer(await api.update_call(acc, request.match_info["sid"], form))

    async def call_delete(request):
        acc = await auth(request)
        sid = request.match_info["sid"]
        rc, session = api.find(acc, sid)
        if session is not None and not session.ended or \
                rc is not None and rc.status not in CALL_FINAL:
            raise RestError(409, 20409, f"Call {sid} is in progress; end it first")
        api.deleted.add(sid)
        api.calls.pop(sid, None)
        return web.Response(status=204)

    async def call_history(request):
        acc = await auth(request)
        return answer(await api.history(acc, request.match_info["sid"]))

    async def call_cost(request):
        acc = await auth(request)
        return answer(await api.cost(acc, request.match_info["sid"]))

    def recordings_of(acc: str, call: str | None) -> list[dict]:
        rows = [api.recording_json(acc, r) for r in reversed(api.recordings.values())
                if r["account"] == acc and (call is None or r["call_sid"] == call)
                and find_recording(engine.cfg.data_dir, r["sid"], acc) is not None]
        return rows

    async def recordings_list(request):
        acc = await auth(request)
        _only(request.query, {"CallSid", "Page", "PageSize", "PageToken", "page", "page_size",
                              "DateCreated", "DateCreated<", "DateCreated>"})
        page, size = _paging(request)
        call = request.query.get("CallSid")
        return answer(page_json("recordings", f"{api.base(acc)}/Recordings.json",
                                recordings_of(acc, call), page, size,
                                {"CallSid": call} if call else {}))

    async def call_recordings(request):
        acc = await auth(request)
        sid = request.match_info["sid"]
        api.find(acc, sid)
        page, size = _paging(request)
        return answer(page_json("recordings", f"{api.base(acc)}/Calls/{sid}/Recordings.json",
                                recordings_of(acc, sid), page, size, {}))

    public = bool((engine.cfg.raw.get("engine", {}) or {}).get("rest_recordings_public", False))

    async def recording(request):
        sid, ext = request.match_info["rsid"], request.match_info["ext"]
        if public and request.method == "GET" and ext == "wav":
            # `[engine] rest_recordings_public`: the media needs no credentials (its
            # name is 128-bit random); the account in the URL must still own it.
            acc = api.by_sid.get(request.match_info["account"])
            if acc is None or not _RECORDING.fullmatch(sid):
                raise RestError(404, 20404, "The requested resource was not found")
            _, path = api.recording(acc, sid)
            return web.FileResponse(path, headers={"Content-Type": "audio/wav"})
        acc = await auth(request)
        if not _RECORDING.fullmatch(sid):
            raise RestError(404, 20404, f"The requested resource Recording {sid[:40]} was "
                                        "not found")
        r, path = api.recording(acc, sid)
        if request.method == "DELETE":
            if ext != "json":
                raise RestError(405, 20405, "DELETE Recordings/{Sid}.json")
            os.unlink(path)
            api.recordings.pop(sid, None)
            return web.Response(status=204)
        if ext == "wav":
            return web.FileResponse(path, headers={"Content-Type": "audio/wav"})
        if ext != "json":
            raise RestError(404, 20404, f"Recording {sid}.{ext[:10]}: .json or .wav")
        return answer(api.recording_json(acc, r))

    async def balance(request):
        acc = await auth(request)
        return answer(await api.balance(acc))

    async def numbers(request):
        acc = await auth(request)
        page, size = _paging(request)
        voice = engine.cfg.accounts[acc].numbers
        texts = {n: r for n, r in engine.cfg.messaging_numbers.items() if r.account == acc}

        def target(route):
            return {"kind": route.kind, "target": route.target,
                    "module": route.module} if route is not None else None

        rows = []
        for number in sorted(set(voice) | set(texts)):
            route, text = voice.get(number), texts.get(number)
            rows.append({"sid": f"PN{number}", "account_sid": api.account_sid(acc),
                         "phone_number": number, "friendly_name": number,
                         "voice_application_sid": _target_of(route, "app"),
                         "voice_url": _target_of(route, "instructions"), "voice_method": "POST",
                         # Twilio's sms_* fields: what a text (SIP MESSAGE) to it runs.
                         "sms_application_sid": _target_of(text, "app"),
                         "sms_url": _target_of(text, "instructions"), "sms_method": "POST",
                         "capabilities": {"voice": route is not None, "sms": text is not None,
                                          "mms": False, "fax": False},
                         "baton_target": target(route), "baton_messaging_target": target(text),
                         "api_version": "2010-04-01",
                         "uri": f"{api.base(acc)}/IncomingPhoneNumbers/PN{number}.json"})
        return answer(page_json("incoming_phone_numbers",
                                f"{api.base(acc)}/IncomingPhoneNumbers.json", rows, page, size, {}))

    async def applications(request):
        acc = await auth(request)
        page, size = _paging(request)
        rows = [{"sid": name, "account_sid": api.account_sid(acc), "friendly_name": name,
                 "api_version": "2010-04-01", "voice_url": None, "voice_method": "POST",
                 "baton_start": a.start, "baton_nodes": sorted(a.nodes),
                 "uri": f"{api.base(acc)}/Applications/{name}.json"}
                for name, a in sorted(engine.cfg.apps.items())]
        return answer(page_json("applications", f"{api.base(acc)}/Applications.json", rows,
                                page, size, {}))

    async def usage(request):
        acc = await auth(request)
        q = request.query
        _only(q, {"StartDate", "EndDate", "Category", "IncludeSubaccounts", "Page", "PageSize",
                  "PageToken", "page", "page_size"})
        page, size = _paging(request)
        rows = await api.usage(acc, q.get("StartDate", ""), q.get("EndDate", ""),
                               q.get("Category", ""))
        query = {k: v for k, v in q.items() if k in ("StartDate", "EndDate", "Category")}
        return answer(page_json("usage_records", f"{api.base(acc)}/Usage/Records.json", rows,
                                page, size, query))

    async def openapi(_request):
        return answer(openapi_document())

    a = f"{API}/Accounts/{{account}}"
    r = app.router
    r.add_get(a + ".json", account)
    r.add_post(a + "/Calls.json", calls_create)
    r.add_get(a + "/Calls.json", calls_list)
    r.add_get(a + "/Calls/{sid}.json", call_fetch)
    r.add_post(a + "/Calls/{sid}.json", call_update)
    r.add_delete(a + "/Calls/{sid}.json", call_delete)
    r.add_get(a + "/Calls/{sid}/History.json", call_history)
    r.add_get(a + "/Calls/{sid}/Cost.json", call_cost)
    r.add_get(a + "/Calls/{sid}/Recordings.json", call_recordings)
    r.add_get(a + "/Recordings.json", recordings_list)
    r.add_get(a + "/Recordings/{rsid}.{ext}", recording)
    r.add_delete(a + "/Recordings/{rsid}.{ext}", recording)
    r.add_get(a + "/Balance.json", balance)
    r.add_get(a + "/Usage/Records.json", usage)
    r.add_get(a + "/IncomingPhoneNumbers.json", numbers)
    r.add_get(a + "/Applications.json", applications)
    r.add_get("/openapi.json", openapi)
    return api


def _target_of(route, kind: str) -> str | None:
    """A number route's target when it is of `kind` (app name, instruction URI)."""
    return route.target if route is not None and route.kind == kind else None


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


def openapi_document() -> dict:
    """The OpenAPI 3 description of the routes in ROUTES."""
    paths: dict = {}
    for method, sub, summary in ROUTES:
        path = f"{API}/Accounts/{{AccountSid}}{sub}"
        params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                  for n in re.findall(r"\{(\w+)\}", path)]
        op = {"summary": summary, "parameters": params,
              "responses": {"200" if method != "DELETE" else "204": {"description": "OK"},
                            "401": {"$ref": "#/components/responses/Error"},
                            "404": {"$ref": "#/components/responses/Error"}},
              "security": [{"basic": []}]}
        if method == "POST":
            op["requestBody"] = {"content": {"application/x-www-form-urlencoded": {
                "schema": {"type": "object"}}}}
            if sub == "/Calls.json":
                op["responses"]["201"] = op["responses"].pop("200")
        paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "Baton REST API (Twilio-compatible)", "version": "2010-04-01"},
        "paths": paths,
        "components": {
            "securitySchemes": {"basic": {"type": "http", "scheme": "basic"}},
            "responses": {"Error": {"description": "Twilio's error body", "content": {
                "application/json": {"schema": {"type": "object", "properties": {
                    "code": {"type": "integer"}, "message": {"type": "string"},
                    "more_info": {"type": "string"}, "status": {"type": "integer"}}}}}}}},
    }
