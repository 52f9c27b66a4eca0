"""A real aiohttp server of TwiML apps for the instructions tests, and an engine helper.

Apps are written with the `twilio` library's `VoiceResponse`, the way a
Twilio developer writes them. Every request is recorded with its form
parameters and whether its `X-Twilio-Signature` passed Twilio's own
`RequestValidator` and its `X-Baton-Signature` passed
`verify_baton_signature`.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import struct
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Union

from aiohttp import web

from tests.helpers import engine_config, running_engine

Reply = Union[str, web.StreamResponse, object]
Handler = Callable[[dict, web.Request], Union[Reply, Awaitable[Reply]]]

def _billion_laughs() -> str:
    ents = ['<!ENTITY lol0 "lol">']
    for i in range(1, 10):
        ents.append(f'<!ENTITY lol{i} "' + f"&lol{i - 1};" * 10 + '">')
    return ('<?xml version="1.0"?>\n<!DOCTYPE lolz [\n' + "\n".join(ents)
            + "\n]>\n<Response><Say>&lol9;</Say></Response>\n")


BILLION_LAUGHS = _billion_laughs()


@dataclass
class Req:
    """One request the app server received."""
    path: str
    method: str
    params: dict
    headers: dict
    url: str
    twilio_valid: bool | None = None
    baton_valid: bool | None = None
    at: float = 0.0


@dataclass
class AppServer:
    """TwiML apps on a loopback port: `route(path, fn)`, then `await start()`."""
    secret: str | None = None
    routes: dict = field(default_factory=dict)
    requests: list = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None

    def route(self, path: str, fn: Handler) -> None:
        self.routes[path] = fn

    def twiml(self, path: str, doc: Reply) -> None:
        """A route that always answers the same document."""
        self.routes[path] = lambda _p, _r: doc

    def got(self, path: str) -> list:
        return [r for r in self.requests if r.path == path]

    async def wait_for(self, path: str, count: int = 1, timeout: float = 10.0) -> list:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.got(path)) < count:
            if loop.time() > deadline:
                raise AssertionError(f"{path}: {len(self.got(path))} of {count} requests; "
                                     f"got {[r.path for r in self.requests]}")
            await asyncio.sleep(0.02)
        return self.got(path)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        from twilio.request_validator import RequestValidator

        from engine.modules.instructions.fetch import verify_baton_signature

        fn = self.routes.get(request.path)
        if fn is None:
            raise web.HTTPNotFound()
        form = dict(await request.post()) if request.method == "POST" else {}
        params = {**dict(request.query), **{k: str(v) for k, v in form.items()}}
        url = str(request.url)
        req = Req(request.path, request.method, params, dict(request.headers), url,
                  at=asyncio.get_running_loop().time())
        if self.secret:
            tsig = request.headers.get("X-Twilio-Signature")
            if tsig is not None:
                req.twilio_valid = RequestValidator(self.secret).validate(url, form, tsig)
            if "X-Baton-Signature" in request.headers:
                req.baton_valid = verify_baton_signature(self.secret, url, form,
                                                         request.headers)
        self.requests.append(req)
        out = fn(params, request)
        if asyncio.iscoroutine(out):
            out = await out
        if isinstance(out, web.StreamResponse):
            return out
        return web.Response(text=str(out), content_type="text/xml")

    async def start(self) -> "AppServer":
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


# -- misbehaving app servers ----------------------------------------------------------

async def hang(_params, _request):
    await asyncio.sleep(30)
    return "<Response/>"


def status_500(_params, _request):
    return web.Response(status=500, text="Internal Server Error")


def garbage(_params, _request):
    return web.Response(text="<Response><Say>unclosed</Response>\x00\x01 not xml",
                        content_type="text/xml")


def billion_laughs(_params, _request):
    return web.Response(text=BILLION_LAUGHS, content_type="text/xml")


async def ten_megabytes(_params, request):
    resp = web.StreamResponse(headers={"Content-Type": "text/xml"})
    await resp.prepare(request)
    await resp.write(b"<Response>")
    chunk = b"<Pause length=\"1\"/>" * 4000
    sent = 0
    try:
        while sent < 10 * 1024 * 1024:
            await resp.write(chunk)
            sent += len(chunk)
        await resp.write(b"</Response>")
    except (ConnectionError, asyncio.CancelledError):
        pass
    return resp


# -- the engine ---------------------------------------------------------------------

@contextlib.asynccontextmanager
async def instructions_engine(raw: dict | None = None, *, secret: str | None = None,
                              twilio: bool = False, http: bool = True):
    """An in-process engine with `baton.instructions` registered and the recordings
    server running; the account `demo` gets `secret`/`twilio_signature`."""
    from engine.runtime import http as http_mod
    from engine.modules.instructions import InstructionsModule, shutdown

    raw = fixed_sip_port(raw or engine_config())
    # The apps run on loopback, which documents may not fetch from unless allowed.
    raw.setdefault("security", {}).setdefault("fetch_allow", ["127.0.0.1/32"])
    async with running_engine(raw) as eng:
        builtins = eng.registry.builtins
        had = builtins.get("baton.instructions")
        builtins["baton.instructions"] = InstructionsModule
        acc = eng.cfg.raw["accounts"]["demo"]
        if secret:
            acc["secret"] = secret
            acc["twilio_signature"] = twilio
        server = await http_mod.start_http(eng, "127.0.0.1:0") if http else None
        try:
            yield eng
        finally:
            for s in list(eng.sessions.values()):
                s.end("shutdown")
            await shutdown(eng)
            if server is not None:
                await server.stop()
            if had is None:
                builtins.pop("baton.instructions", None)
            else:
                builtins["baton.instructions"] = had


def fixed_sip_port(raw: dict) -> dict:
    """Give the engine a SIP port free for both UDP and TCP now: with port 0 the
    engine picks a UDP port and then needs the same TCP port, which an
    ephemeral TCP connection of these tests may hold."""
    from tests.helpers import free_port

    eng = raw.setdefault("engine", {})
    if eng.get("sip_addr", "127.0.0.1:0").endswith(":0"):
        eng["sip_addr"] = f"127.0.0.1:{free_port()}"
    return raw


class Events:
    """Collects engine.notify events: `events.of(kind)`."""

    def __init__(self, eng):
        self.items: list = []
        eng.listeners.append(self)

    def __call__(self, session, event, detail) -> None:
        self.items.append((session.id, event, dict(detail)))

    def of(self, event: str, session_id: str | None = None) -> list:
        return [d for s, e, d in self.items if e == event and (session_id is None or s == session_id)]


# -- audio checks -------------------------------------------------------------------

def tone_payload(freq: float, n: int, level: float = 6000.0) -> bytes:
    """One 20 ms μ-law frame of a sine, frame number `n` (continuous phase)."""
    import numpy as np

    from ext.g711_py import ulaw_encode

    t = (np.arange(160) + 160 * n) / 8000.0
    return ulaw_encode((level * np.sin(2 * math.pi * freq * t)).astype(np.int16))


def pcm_of(packets: list, pt: int = 0):
    """The received audio (PT 0 packets) as one int16 array."""
    import numpy as np

    from ext.g711_py import ulaw_decode

    frames = [p[12:] for p in packets if len(p) > 12 and (p[1] & 0x7F) == pt]
    if not frames:
        return np.zeros(0, dtype=np.int16)
    return np.frombuffer(ulaw_decode(b"".join(frames)), dtype="<i2").astype(np.int16)


def rms(pcm) -> float:
    import numpy as np

    if len(pcm) == 0:
        return 0.0
    return float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2)))


def band_level(pcm, freq: float) -> float:
    """Amplitude of `freq` in `pcm` (a single-bin DFT, normalised)."""
    import numpy as np

    if len(pcm) == 0:
        return 0.0
    t = np.arange(len(pcm)) / 8000.0
    x = pcm.astype(np.float64)
    return float(abs(np.dot(x, np.exp(-2j * math.pi * freq * t))) * 2 / len(pcm))


def rtp_header(pkt: bytes):
    return struct.unpack("!BBHII", pkt[:12])
