"""Issue 15, shared resources and server-side requests: documents' fetches reach
no loopback, link-local or engine port unless the operator allows it, and their
errors echo nothing of a reply; a document cannot raise its fetch timeout past
the operator's cap; the speech cache is bounded on disk; Watch streams are capped
per token."""
from __future__ import annotations

import asyncio
import os
import shutil

import pytest

pytest.importorskip("ext.rtp", reason="ext.rtp is not built (make build)")

import grpc  # noqa: E402
from aiohttp import web  # noqa: E402

from proto import pb  # noqa: E402
from tests.helpers import engine_config, running_engine  # noqa: E402
from tests.test_sessions import Caller  # noqa: E402
from tests.twiml_apps import AppServer, Events, instructions_engine  # noqa: E402
from tests.vendor_procs.harness import (OTHER_TOKEN, bearer, control_config,  # noqa: E402
                                        target, wait_until)

sp = pb.sessions_pb2
LEAK = b"SECRET-INTERNAL-BYTES"


class Bait:
    """A loopback TCP service a document must not reach: counts connections and
    answers with bytes that must never show up in an error."""

    def __init__(self):
        self.connections = 0
        self.server = None
        self.port = 0

    async def start(self) -> "Bait":
        async def handle(reader, writer):
            self.connections += 1
            writer.write(b"HTTP/1.0 500 " + LEAK + b"\r\nContent-Length: 21\r\n\r\n" + LEAK)
            await writer.drain()
            writer.close()
        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def close(self) -> None:
        self.server.close()


async def _errors_of(eng, events, number: str, verb: str) -> list:
    caller = Caller(eng, number)
    await caller.dial()
    await wait_until(lambda: any(s.number == number for s in eng.finished), timeout=15)
    caller.close()
    sid = [s for s in eng.finished if s.number == number][-1].id
    return [e for e in events.of("error", sid) if e.get("verb") == verb]


async def test_document_fetches_reach_no_loopback_engine_port_or_metadata_address():
    bait = await Bait().start()
    app = AppServer()
    app.route("/bounce", lambda _p, _r: web.HTTPFound(f"http://127.0.0.1:{bait.port}/x.wav"))
    await app.start()
    app_port = int(app.url.rsplit(":", 1)[1].split("/")[0])
    targets = {"4001": f"http://127.0.0.1:{bait.port}/x.wav",       # a local service
               "4002": app.url + "/bounce",                          # redirected to it
               "4003": "http://169.254.169.254/latest/meta-data",    # cloud metadata
               "4004": None}                                         # the engine's own port
    for number, url in targets.items():
        app.route(f"/{number}", lambda _p, _r, u=url, n=number: (
            f"<Response><Play>{u or engine_url[0] + '/recordings/RE' + '0' * 32}</Play>"
            "<Hangup/></Response>"))
    raw = engine_config()
    raw["engine"]["http_addr"] = "127.0.0.1:0"
    # The operator allows its own app server (and only it) on this machine.
    raw["security"] = {"fetch_allow": [f"127.0.0.1:{app_port}"]}
    for number in targets:
        raw["accounts"]["demo"]["numbers"][number] = {"instructions": f"{app.url}/{number}"}
    engine_url: list = []
    async with instructions_engine(raw) as eng:
        from engine.runtime import http as http_mod

        engine_url.append(http_mod.http_url(eng))
        events = Events(eng)
        for number in targets:
            errs = await _errors_of(eng, events, number, "Play")
            assert errs, (number, events.items)
            assert errs[0]["reason"].endswith(": destination not allowed"), errs
            assert LEAK.decode() not in errs[0]["reason"]
        assert bait.connections == 0
    bait.close()
    await app.stop()


async def test_http_errors_echo_no_reply_bytes():
    app = AppServer()
    app.route("/start", lambda _p, _r: f"<Response><Play>{app.url}/broken.wav</Play>"
                                       "<Hangup/></Response>")
    app.route("/broken.wav", lambda _p, _r: web.Response(status=500, reason=LEAK.decode(),
                                                         body=LEAK))
    await app.start()
    raw = engine_config()
    raw["accounts"]["demo"]["numbers"]["4000"] = {"instructions": app.url + "/start"}
    async with instructions_engine(raw) as eng:
        events = Events(eng)
        errs = await _errors_of(eng, events, "4000", "Play")
        assert errs and errs[0]["reason"].endswith(": HTTP 500"), errs
    await app.stop()


async def test_a_document_cannot_raise_its_fetch_timeout_past_the_cap():
    async def slow(_p, _r):
        await asyncio.sleep(2.5)
        return "<Response><Say>too late</Say></Response>"

    app = AppServer()
    app.route("/start", lambda _p, _r: "<Response><Redirect>module:baton.instructions?url="
                                       + app.url + "/slow&amp;timeout=600</Redirect></Response>")
    app.route("/slow", slow)
    await app.start()
    raw = engine_config()
    raw["security"] = {"fetch_timeout_max": 1}
    raw["accounts"]["demo"]["numbers"]["4000"] = {"instructions": app.url + "/start"}
    async with instructions_engine(raw) as eng:
        events = Events(eng)
        caller = Caller(eng, "4000")
        # The call is refused (480) once the fetch gives up.
        dial = asyncio.ensure_future(caller.dial(expect=480))
        await wait_until(lambda: any("within" in str(d.get("reason"))
                                     for d in events.of("error")), timeout=10)
        reasons = [d["reason"] for d in events.of("error")]
        assert any("no complete response within 1 s" in r for r in reasons), reasons
        await asyncio.gather(dial, return_exceptions=True)
        caller.close()
    await app.stop()


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
async def test_speech_cache_is_bounded_on_disk(tmp_path):
    from engine.media.tts import SpeechCache

    cache = SpeechCache(tmp_path / "tts", disk_bytes=60_000)
    for n in range(6):
        await cache.say(f"Caller number {n} says something rather long to fill the cache.")
    files = [f for f in os.listdir(tmp_path / "tts") if f.endswith(".wav")]
    total = sum(os.path.getsize(tmp_path / "tts" / f) for f in files)
    assert total <= 60_000 and 0 < len(files) < 6, (total, files)
    assert os.path.exists(cache.path_for(
        "Caller number 5 says something rather long to fill the cache.")), "newest kept"


async def test_watch_streams_are_capped_per_token():
    raw = control_config()
    raw["security"] = {"watch_streams_per_token": 2}
    async with running_engine(raw) as eng:
        counts = eng.control.sessions.watch_counts
        async with grpc.aio.insecure_channel(target(eng)) as ch:
            stub = pb.sessions_pb2_grpc.SessionsStub(ch)

            def watching(token=None) -> asyncio.Task:
                async def run():
                    async for _ in stub.Watch(sp.WatchRequest(), metadata=bearer(*(
                            [token] if token else []))):
                        pass
                return asyncio.ensure_future(run())

            first = [watching(), watching()]
            await wait_until(lambda: sum(counts.values()) == 2)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(watching(), 5)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "watch_streams_per_token" in err.value.details()
            # Another token has its own allowance; a closed stream frees a place.
            other = watching(OTHER_TOKEN)
            await wait_until(lambda: sum(counts.values()) == 3)
            first[0].cancel()
            await wait_until(lambda: sum(counts.values()) == 2)
            again = watching()
            await wait_until(lambda: sum(counts.values()) == 3)
            assert not again.done()
            for t in (first[1], other, again):
                t.cancel()
            await asyncio.gather(first[0], first[1], other, again, return_exceptions=True)
