"""The Twilio-compatible REST API, driven by the official `twilio` client against
a real `baton serve`: calls placed to a number of the same engine, status
callbacks validated with Twilio's RequestValidator on a local aiohttp server,
redirects, paging, hang-up, recordings, the Baton extensions, and the errors
(bad credentials, another account, a bad parameter, a body over the cap)."""
from __future__ import annotations

import asyncio
import base64
import json
import re
import threading
import time
import urllib.request

import pytest

twilio = pytest.importorskip("twilio")
from twilio.base.exceptions import TwilioRestException  # noqa: E402
from twilio.request_validator import RequestValidator  # noqa: E402
from twilio.rest import Client  # noqa: E402

from tests.helpers import EngineProcess, free_port  # noqa: E402
from tests.services_helpers import prerender  # noqa: E402

SID = "AC0123456789abcdef0123456789abcdef"
TOKEN = "acme-auth-token-0123456789abcdef"
OTHER = "ACfedcba9876543210fedcba9876543210"
OTHER_TOKEN = "other-auth-token-0123456789abcdef"
KEY_SECRET = "api-key-secret-0123456789abcdef"

RECORD = ('<Response><Play digits="1"/><Record maxLength="2" timeout="0" playBeep="false" action="/after"/>'
          '</Response>')
AFTER = '<Response><Pause length="30"/></Response>'
SPOKEN = "Baton records what this number says."
CALLEE = f'<Response><Say loop="0">{SPOKEN}</Say></Response>'


class AppServer:
    """A TwiML app and a status-callback receiver (aiohttp, in a thread)."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.callbacks: list[tuple[str, dict, str]] = []   # (url, form, signature)
        self.fetches: list[str] = []
        self.attempts: list[tuple] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self):
        from aiohttp import web

        async def voice(request):
            self.fetches.append(request.path)
            text = {"/record": RECORD, "/callee": CALLEE}.get(request.path, AFTER)
            return web.Response(text=text, content_type="application/xml")

        async def status(request):
            form = dict(await request.post())
            self.callbacks.append((self.url + request.path_qs, form,
                                   request.headers.get("X-Twilio-Signature", "")))
            return web.Response(text="")

        async def flaky(request):
            # The first attempt of each callback fails: it is retried before the next.
            form = dict(await request.post())
            key = (form.get("CallSid"), form.get("SequenceNumber"))
            self.attempts.append(key)
            if self.attempts.count(key) == 1:
                return web.Response(status=500)
            self.callbacks.append((self.url + request.path_qs, form,
                                   request.headers.get("X-Twilio-Signature", "")))
            return web.Response(text="")

        async def start():
            app = web.Application()
            app.router.add_post("/record", voice)
            app.router.add_post("/after", voice)
            app.router.add_post("/callee", voice)
            app.router.add_post("/status", status)
            app.router.add_post("/flaky", flaky)
            self.runner = web.AppRunner(app, access_log=None)
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(start())
        self.ready.set()
        self.loop.run_forever()

    def close(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def callbacks_of(self, sid: str) -> list[dict]:
        return [f for _, f, _ in self.callbacks if f.get("CallSid") == sid]


@pytest.fixture(scope="module")
def app_server():
    s = AppServer()
    yield s
    s.close()


@pytest.fixture(scope="module")
def engine(tmp_path_factory, app_server):
    path = tmp_path_factory.mktemp("rest") / "rest.toml"
    path.write_text(f"""
[media]
address = "127.0.0.1"

[security]
fetch_allow = ["127.0.0.1/32"]      # the test's TwiML app runs on this machine

[accounts.acme]
sid = "{SID}"
auth_token = "{TOKEN}"

[accounts.acme.numbers]
"1000" = {{ module = "baton.hold" }}
"2000" = {{ instructions = "{app_server.url}/callee" }}

[accounts.other]
sid = "{OTHER}"
auth_token = "{OTHER_TOKEN}"

[api_keys.SK0123]
account = "acme"
token = "{KEY_SECRET}"
quota = 3

[apps.twonode]
start = "hold"

[apps.twonode.nodes.hold]
module = "baton.hold"

[apps.twonode.nodes.echo]
module = "baton.echo"
""")
    http_port, metrics_port = free_port(), free_port()
    eng = EngineProcess(str(path), extra=["--http-addr", f"127.0.0.1:{http_port}",
                                          "--metrics-addr", f"127.0.0.1:{metrics_port}"])
    eng.http_url = f"http://127.0.0.1:{http_port}"
    eng.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    with eng:
        # SIP answers before the HTTP server is up: wait for /health too.
        wait_for(lambda: raw(eng, "GET", "/health", auth=None)[0] == 200, what="HTTP")
        # The callee's prompt is in the speech cache before any call needs it.
        asyncio.run(prerender(eng, SPOKEN))
        yield eng
        eng.stop()


def client_for(engine, sid=SID, token=TOKEN) -> Client:
    c = Client(sid, token)
    c.api.base_url = engine.http_url
    return c


def wait_for(pred, timeout=30.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def status_is(client, sid: str, status: str):
    c = client.calls(sid).fetch()
    if c.status != status and c.status in ("completed", "failed", "busy", "no-answer"):
        raise AssertionError(f"call {sid} is {c.status}, not {status}")
    return c if c.status == status else None


def raw(engine, method, path, data: bytes | None = None, auth=(SID, TOKEN), headers=None):
    """(status, headers, body) of one request, without the twilio client."""
    req = urllib.request.Request(engine.http_url + path, data=data, method=method,
                                 headers=headers or {})
    if auth is not None:
        req.add_header("Authorization", "Basic " +
                       base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()
    except OSError:
        return 0, {}, b""


def test_call_lifecycle_with_the_twilio_client(engine, app_server):
    client = client_for(engine)
    cb = f"{app_server.url}/status"
    # To a number of the same engine whose TwiML app speaks; this call's app records it.
    call = client.calls.create(to="2000", from_="+15550100", url=f"{app_server.url}/record",
                               status_callback=cb,
                               status_callback_event=["initiated", "ringing", "answered",
                                                      "completed"])
    assert re.fullmatch(r"S[0-9a-f]{14}", call.sid)
    assert call.status == "queued" and call.direction == "outbound-api"

    # In progress: fetched while the TwiML app records the far end (hold music).
    c = wait_for(lambda: status_is(client, call.sid, "in-progress"), what="in-progress")
    assert c.to == "2000" and c._from == "+15550100" and c.start_time is not None
    wait_for(lambda: "/after" in app_server.fetches, what="the Record action")

    # Redirect with new TwiML: a new span of the instructions module, reason api.
    c = client.calls(call.sid).update(twiml='<Response><Pause length="20"/></Response>')
    assert c.status == "in-progress"
    hist = client.request("GET", f"{engine.http_url}/2010-04-01/Accounts/{SID}/Calls/"
                                 f"{call.sid}/History.json")
    hist = json.loads(hist.text)
    assert [h["reason"] for h in hist["history"]] == ["initial", "api"]
    assert hist["live"] is True

    # The Baton extension: hand the call to a module through the policy.
    r = client.request("POST", f"{engine.http_url}/2010-04-01/Accounts/{SID}/Calls/{call.sid}.json",
                       data={"Module": "baton.hold"})
    assert r.status_code == 200 and json.loads(r.text)["module"] == "baton.hold"

    # End it.
    c = client.calls(call.sid).update(status="completed")
    c = wait_for(lambda: (lambda x: x if x.status == "completed" else None)(
        client.calls(call.sid).fetch()), what="completed")
    assert c.end_time is not None and int(c.duration) >= 2

    # Status callbacks: in order, numbered, signed with the auth token.
    forms = wait_for(lambda: (lambda f: f if f and f[-1]["CallStatus"] == "completed" else None)(
        app_server.callbacks_of(call.sid)), what="the completed callback")
    statuses = [f["CallStatus"] for f in forms]
    assert statuses[0] == "initiated" and statuses[-1] == "completed"
    assert "in-progress" in statuses
    assert [int(f["SequenceNumber"]) for f in forms] == list(range(len(forms)))
    assert forms[-1]["CallDuration"] == c.duration
    assert all(f["CallbackSource"] == "call-progress-events" and f["AccountSid"] == SID
               and f["Direction"] == "outbound-api" for f in forms)
    validator = RequestValidator(TOKEN)
    mine = [x for x in app_server.callbacks if x[1].get("CallSid") == call.sid]
    assert all(validator.validate(url, form, sig) for url, form, sig in mine)
    assert not RequestValidator("not-the-token-0123456789").validate(*mine[0])

    # Its recording, through the client, and the media.
    recs = client.recordings.list(call_sid=call.sid)
    assert len(recs) == 1 and recs[0].call_sid == call.sid and int(recs[0].duration) >= 1
    status, headers, body = raw(engine, "GET", f"/2010-04-01/Accounts/{SID}/Recordings/"
                                               f"{recs[0].sid}.wav")
    assert status == 200 and body[:4] == b"RIFF" and len(body) > 8000
    assert raw(engine, "GET", f"/2010-04-01/Accounts/{SID}/Recordings/{recs[0].sid}.wav",
               auth=None)[0] == 401
    # Another account sees neither the call nor the recording.
    other = client_for(engine, OTHER, OTHER_TOKEN)
    with pytest.raises(TwilioRestException) as exc:
        other.calls(call.sid).fetch()
    assert exc.value.status == 404 and exc.value.code == 20404
    assert raw(engine, "GET", f"/2010-04-01/Accounts/{OTHER}/Recordings/{recs[0].sid}.json",
               auth=(OTHER, OTHER_TOKEN))[0] == 404
    # Usage per module and level (the seed's view): the TwiML's time is application level.
    records = wait_for(lambda: [r for r in client.usage.records.list()
                                if r.category == "baton.instructions/application"], what="usage")
    assert float(records[0].usage) > 0 and records[0].usage_unit
    status, _, body = raw(engine, "GET", f"/2010-04-01/Accounts/{SID}/Usage/Records.json"
                                          "?Category=application")
    rows = json.loads(body)["usage_records"]
    assert status == 200 and rows and {r["baton_level"] for r in rows} == {"application"}
    # Its cost, as the accountant priced it (the gRPC Sessions.Cost servicer's answer),
    # final once the accountant has read the call's end from the ring.
    def final_cost():
        r = client.request("GET", f"{engine.http_url}/2010-04-01/Accounts/{SID}/Calls/"
                                  f"{call.sid}/Cost.json")
        assert r.status_code == 200, r.text
        c = json.loads(r.text)
        return c if c["live"] is False else None

    cost = wait_for(final_cost, what="the ended call's final cost")
    assert cost["price_unit"] == "USD" and "price" in cost
    # Deleting an ended call forgets it.
    assert client.calls(call.sid).delete() is True
    with pytest.raises(TwilioRestException) as exc:
        client.calls(call.sid).fetch()
    assert exc.value.status == 404


def test_list_pages_across_120_calls(engine):
    client = client_for(engine)
    to = f"sip:9999@127.0.0.1:{engine.port}"     # no such number: 404, the call fails at once
    sids = [client.calls.create(to=to, from_="+15550199", twiml="<Response/>").sid
            for _ in range(120)]
    wait_for(lambda: all(c.status == "failed" for c in client.calls.list(from_="+15550199",
                                                                         page_size=200)),
             what="120 failed calls")
    page = client.calls.page(from_="+15550199", page_size=50)
    assert len(list(page)) == 50 and page.next_page_url is not None
    assert page._payload["page"] == 0 and page._payload["previous_page_uri"] is None
    listed = client.calls.list(from_="+15550199", page_size=50)
    assert sorted(c.sid for c in listed) == sorted(sids)
    last = page.next_page().next_page()
    assert len(list(last)) == 20 and last.next_page_url is None
    assert last._payload["first_page_uri"].startswith(f"/2010-04-01/Accounts/{SID}/Calls.json?")
    assert client.calls.list(from_="+15550199", status="in-progress") == []
    # StartTime filters, in the engine's own clock (the calls' date_created).
    import datetime as dt

    created = listed[0].date_created
    day = created.date()
    assert len(client.calls.list(from_="+15550199", start_time=day)) == 120
    later = created + dt.timedelta(days=1)
    assert client.calls.list(from_="+15550199", start_time_after=later) == []
    assert len(client.calls.list(from_="+15550199", start_time_before=later)) == 120


def test_errors_in_twilios_terms(engine):
    base = f"/2010-04-01/Accounts/{SID}"
    bad = Client(SID, "wrong-token-0123456789")
    bad.api.base_url = engine.http_url
    with pytest.raises(TwilioRestException) as exc:
        bad.calls("S0123").fetch()
    assert exc.value.status == 401 and exc.value.code == 20003
    status, headers, body = raw(engine, "GET", base + "/Calls.json", auth=(SID, "nope"))
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic ")
    # Another account's URL with these credentials: not there.
    status, _, body = raw(engine, "GET", f"/2010-04-01/Accounts/{OTHER}/Calls.json")
    assert status == 404 and b'"code":20404' in body

    client = client_for(engine)
    with pytest.raises(TwilioRestException) as exc:
        client.calls.create(to="not a number", from_="+15550100", twiml="<Response/>")
    assert exc.value.status == 400 and exc.value.code == 21211 and "To" in exc.value.msg
    with pytest.raises(TwilioRestException) as exc:
        client.calls.create(to="1000", from_="+15550100", url="ftp://x", )
    assert exc.value.code == 21205 and "Url" in exc.value.msg
    status, _, body = raw(engine, "POST", base + "/Calls.json",
                          data=b"To=1000&From=%2B1555&Twiml=%3CResponse%2F%3E&Bogus=1",
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 400 and b"Bogus" in body
    # A body over the cap: 413 in Twilio's shape, and the engine goes on.
    big = b"To=1000&From=%2B1555&Twiml=" + b"x" * (70 * 1024)
    status, _, body = raw(engine, "POST", base + "/Calls.json", data=big,
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 413 and b'"status":413' in body
    # Malformed requests get Twilio's JSON 4xx; none reaches the engine's internals.
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    odd = [
        ("GET", base + "/Calls.json?PageSize=abc", None, {}, 400),
        ("GET", base + "/Calls.json?PageSize=5000", None, {}, 400),
        ("GET", base + "/Calls.json?StartTime%3E=yesterday", None, {}, 400),
        ("POST", base + "/Calls.json", b'{"To": "1000"}', {"Content-Type": "application/json"},
         415),
        ("POST", base + "/Calls.json", b"To=1000&To=1001&From=1&Twiml=x", form, 400),
        ("POST", base + "/Calls.json", b"To=1000&From=%ff%fe&Twiml=x", form, 400),
        ("POST", base + "/Calls.json", b"To=1000&From=1&Url=http://x&Twiml=y", form, 400),
        ("POST", base + "/Calls.json", b"To=1000&From=1&Twiml=x&Timeout=-1", form, 400),
        ("POST", base + "/Calls.json", b"To=1000&From=1&Twiml=x&StatusCallbackEvent=bogus",
         form, 400),
        ("POST", base + "/Calls/S0000.json", b"Status=completed", form, 404),
        ("GET", base + "/Recordings/..%2F..%2Fetc.wav", None, {}, 404),
    ]
    for method, path, data, headers, want in odd:
        status, _, body = raw(engine, method, path, data=data, headers=headers)
        assert status == want and json.loads(body)["status"] == want, (path, data, body)
    for header in ("Basic !!!", "Basic " + base64.b64encode(b"\xff\xfe").decode(), "Bearer x"):
        status, _, body = raw(engine, "GET", base + "/Calls.json", auth=None,
                              headers={"Authorization": header})
        assert status == 401 and json.loads(body)["code"] == 20003
    assert len(client.calls.list(limit=1)) <= 1


def test_openapi_lists_every_route(engine):
    from control.rest import ROUTES

    status, _, body = raw(engine, "GET", "/openapi.json", auth=None)
    doc = json.loads(body)
    assert status == 200 and doc["openapi"].startswith("3.")
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    served = {(m, f"/2010-04-01/Accounts/{{AccountSid}}{sub}") for m, sub, _ in ROUTES}
    assert documented == served
    # Every documented route answers (401 without credentials: it exists).
    for method, path in sorted(documented):
        url = path.replace("{AccountSid}", SID).replace("{CallSid}", "Sx") \
            .replace("{RecordingSid}", "RE" + "0" * 32).replace("{MessageSid}", "SM" + "0" * 32)
        assert raw(engine, method, url, auth=None, data=b"" if method == "POST" else None)[0] \
            == 401, (method, url)


def late_ticks(engine) -> float:
    with urllib.request.urlopen(engine.metrics_url, timeout=10) as r:
        text = r.read().decode()
    m = re.search(r"^baton_media_late_ticks_total (\S+)$", text, re.M)
    assert m, "baton_media_late_ticks_total in /metrics"
    return float(m.group(1))


def test_concurrent_lists_while_calls_run(engine):
    import aiohttp

    client = client_for(engine)
    live = [client.calls.create(to="1000", from_="+15550300", twiml=AFTER).sid for _ in range(5)]
    wait_for(lambda: all(client.calls(s).fetch().status == "in-progress" for s in live),
             what="5 live calls")
    auth = "Basic " + base64.b64encode(f"{SID}:{TOKEN}".encode()).decode()

    async def burst():
        # 1,000 requests at once, each on its own connection.
        async with aiohttp.ClientSession(headers={"Authorization": auth},
                                         connector=aiohttp.TCPConnector(limit=0)) as s:
            async def one():
                async with s.get(f"{engine.http_url}/2010-04-01/Accounts/{SID}/Calls.json"
                                 "?Status=in-progress&PageSize=20") as r:
                    return r.status, (await r.json())
            return await asyncio.gather(*(one() for _ in range(1000)))

    # The media clock shares the engine's loop: a burst never holds it past a tick.
    # (A busy machine may delay one tick on its own: a burst gets three chances, and
    # a handler that held the loop would make every one late.)
    late = []
    for _ in range(3):
        before = late_ticks(engine)
        results = asyncio.run(burst())
        late.append(late_ticks(engine) - before)
        assert all(st == 200 for st, _ in results)
        if late[-1] == 0:
            break
    assert 0 in late, f"late media ticks during each burst: {late}"
    assert all(st == 200 for st, _ in results)
    assert all({c["sid"] for c in j["calls"]} >= set(live) for _, j in results)
    assert all(client.calls(s).fetch().status == "in-progress" for s in live)
    for s in live:
        assert client.calls(s).update(status="completed").sid == s


def test_baton_extensions_api_keys_and_account_resources(engine, app_server):
    client = client_for(engine)
    call = client.calls.create(to="1000", from_="+15550400", application_sid="twonode",
                               status_callback=f"{app_server.url}/flaky",
                               status_callback_event=["initiated", "answered", "completed"])
    wait_for(lambda: status_is(client, call.sid, "in-progress"), what="in-progress")
    base = f"{engine.http_url}/2010-04-01/Accounts/{SID}/Calls/{call.sid}"
    # Node=: a node of the call's app, through the policy, as gRPC Transition.
    r = client.request("POST", base + ".json", data={"Node": "echo"})
    assert r.status_code == 200 and json.loads(r.text)["module"] == "baton.echo", r.text
    r = client.request("POST", base + ".json", data={"Node": "nope"})
    assert r.status_code == 400 and "Node" in json.loads(r.text)["message"]
    r = client.request("POST", base + ".json", data={"Module": "not a code"})
    assert r.status_code == 400 and "Module" in json.loads(r.text)["message"]
    hist = json.loads(client.request("GET", base + "/History.json").text)["history"]
    assert [(h["node"], h["reason"]) for h in hist] == [("hold", "initial"), ("echo", "api")]
    client.calls(call.sid).update(status="completed")
    # Callbacks whose first attempts failed: retried, still in order, each once.
    forms = wait_for(lambda: (lambda f: f if f and f[-1]["CallStatus"] == "completed" else None)(
        app_server.callbacks_of(call.sid)), what="the completed callback")
    assert [f["CallStatus"] for f in forms] == ["initiated", "in-progress", "completed"]
    assert [f["SequenceNumber"] for f in forms] == ["0", "1", "2"]
    tried = [k[1] for k in app_server.attempts if k[0] == call.sid]
    assert tried == ["0", "0", "1", "1", "2", "2"]

    # The account's numbers, apps and balance through the client.
    numbers = {n.phone_number for n in client.incoming_phone_numbers.list()}
    assert numbers == {"1000", "2000"}
    assert "twonode" in {a.friendly_name for a in client.applications.list()}
    bal = client.balance.fetch()
    assert bal.account_sid == SID and bal.currency == "USD"

    # An API key acts for its account and is metered: its quota of 3, then 429.
    keyed = Client("SK0123", KEY_SECRET, account_sid=SID)
    keyed.api.base_url = engine.http_url
    for _ in range(3):
        assert keyed.calls(call.sid).fetch().sid == call.sid
    with pytest.raises(TwilioRestException) as exc:
        keyed.calls(call.sid).fetch()
    assert exc.value.status == 429 and exc.value.code == 20429
    # A key's token under another name is no credential.
    wrong = Client("SKother", KEY_SECRET, account_sid=SID)
    wrong.api.base_url = engine.http_url
    with pytest.raises(TwilioRestException) as exc:
        wrong.calls(call.sid).fetch()
    assert exc.value.status == 401
