"""The engine's HTTP server: recordings at their `RecordingUrl`, and the
Twilio-compatible REST API (control/rest.py, docs/rest.md).

`start_http(engine)` serves, on `[engine] http_addr` (HOST:PORT, port 0 for
any free port):

- `GET /recordings/RE<32 hex>` and the same with `.wav`: a recording made
  by `<Record>` (audio/wav), kept in `DATA/recordings/ACCOUNT/`. Names are
  128-bit random, so a URL is the capability to fetch it; nothing else under
  the data directory is reachable.
- `GET /health`: `ok`.
- `/2010-04-01/Accounts/{AccountSid}/...` and `/openapi.json`: the REST API,
  unless `[engine] rest = false`.

The returned runner's `url` is the base of every `RecordingUrl`
(`http_url(engine)` reads it back), and `await runner.stop()` closes it.
"""
from __future__ import annotations

import logging
import re
import weakref

log = logging.getLogger("baton.http")

__all__ = ["start_http", "http_url", "HttpServer"]

_NAME = re.compile(r"(RE[0-9a-f]{32})(\.wav)?")
_urls: "weakref.WeakKeyDictionary[object, str]" = weakref.WeakKeyDictionary()


def http_url(engine) -> str | None:
    """The base URL of the engine's HTTP server (`http://HOST:PORT`), None when not serving."""
    return _urls.get(engine)


class HttpServer:
    """A running server: `url`, `host`, `port`, and `stop()`."""

    def __init__(self, engine, runner, host: str, port: int, advertise: str):
        self.engine = engine
        self.runner = runner
        self.host = host
        self.port = port
        h = f"[{advertise}]" if ":" in advertise else advertise
        self.url = f"http://{h}:{port}"
        self.rest = None               # the REST API (control/rest.py), when served

    async def stop(self) -> None:
        """Stop serving (requests in progress get a moment to finish)."""
        if _urls.get(self.engine) == self.url:
            del _urls[self.engine]
        if self.rest is not None:
            await self.rest.close()
        await self.runner.cleanup()


def _addr(engine, addr: str | None) -> tuple[str, int]:
    from engine.common.net import parse_hostport

    if addr is None:
        addr = engine.cfg.http_addr or "127.0.0.1:0"
    return parse_hostport(addr, 0)


async def start_http(engine, addr: str | None = None) -> HttpServer:
    """Start serving recordings on `addr` (default `[engine] http_addr`, else a free
    loopback port)."""
    from aiohttp import web

    from engine.media.files import find_recording

    host, port = _addr(engine, addr)

    async def recording(request: web.Request) -> web.StreamResponse:
        m = _NAME.fullmatch(request.match_info["name"])
        if m is None:
            raise web.HTTPNotFound()
        path = find_recording(engine.cfg.data_dir, m.group(1))
        if path is None:
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers={"Content-Type": "audio/wav",
                                               "Cache-Control": "private, max-age=3600"})

    async def health(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=64 * 1024)
    app.router.add_get("/recordings/{name}", recording)
    app.router.add_get("/health", health)
    rest = None
    if engine.cfg.raw.get("engine", {}).get("rest", True):
        from control.rest import add_routes
        from control.rest_messages import add_message_routes

        rest = add_routes(app, engine)
        add_message_routes(app, rest)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError as err:
        await runner.cleanup()
        err.config_key = f"engine.http_addr {host}:{port}"    # what `baton serve` names
        raise
    bound = port
    for s in runner.addresses:
        bound = s[1]
        break
    advertise = host if host not in ("0.0.0.0", "::", "") else engine.cfg.advertise
    server = HttpServer(engine, runner, host, bound, advertise)
    engine.cfg.guard.own_ports.add(bound)   # documents may not fetch from it
    server.rest = rest
    if rest is not None:
        rest.http = server
    _urls[engine] = server.url
    log.info("serving recordings over HTTP at %s", server.url)
    return server
