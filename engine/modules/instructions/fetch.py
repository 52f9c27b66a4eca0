"""Fetching instruction documents and audio over HTTP(S), signed, bounded and pooled.

One `Fetcher` per engine holds one aiohttp `ClientSession`, so every call of
every app shares a pool of keep-alive connections. Every request has a
connect timeout and a total timeout, and a body larger than its limit is
cut off while it arrives (the `Content-Length` is checked first), so a slow,
silent or flooding app server costs one call a timeout and nothing more.

Signatures (see docs/instructions.md):

- `X-Baton-Signature: v1=<hex>`: HMAC-SHA256 with the account secret over
  ``timestamp + "\\n" + full URL + "\\n" + sorted form body``, with the Unix
  time in `X-Baton-Timestamp`, so an app can refuse replays
  (`verify_baton_signature`).
- `X-Twilio-Signature`: Twilio's HMAC-SHA1 over the URL followed by each
  POST parameter name and value in sorted order, base64; sent when the
  account sets `twilio_signature = true`, so apps validating with Twilio's
  `RequestValidator` (and the account secret as the auth token) keep working.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import time
from collections import deque
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from engine.media.commands.urlaudio import UrlAudio

log = logging.getLogger("baton.instructions.fetch")

__all__ = ["Fetcher", "FetchError", "Response", "baton_signature", "twilio_signature",
           "verify_baton_signature", "signed_headers", "with_query"]

USER_AGENT = "Baton-Instructions/1.0"
REPLAY_WINDOW = 300.0


class FetchError(Exception):
    """A request that did not produce a usable body. `code` is Twilio-style:
    11200 retrieval failure (e.g. an HTTP error status), 11205 connection
    failure or timeout, 11210 bad host name, 11750 body too large."""

    def __init__(self, reason: str, code: int = 11200, status: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.status = status


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str
    elapsed: float


# -- signatures ------------------------------------------------------------------

def _sorted_body(params: dict) -> str:
    return urlencode(sorted((str(k), str(v)) for k, v in params.items()))


def baton_signature(secret: str, url: str, params: dict, timestamp: int | str) -> str:
    """The `X-Baton-Signature` value for a request (params: the POST form, {} for GET)."""
    msg = f"{timestamp}\n{url}\n{_sorted_body(params)}".encode()
    return "v1=" + hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()


def twilio_signature(secret: str, url: str, params: dict) -> str:
    """The `X-Twilio-Signature` value, as Twilio computes it (HMAC-SHA1, base64)."""
    s = url + "".join(f"{k}{params[k]}" for k in sorted(params))
    return base64.b64encode(hmac.new(secret.encode(), s.encode(), hashlib.sha1).digest()).decode()


def verify_baton_signature(secret: str, url: str, params: dict, headers, *,
                           window: float = REPLAY_WINDOW, now: float | None = None) -> bool:
    """Check a request's `X-Baton-Signature` and that its timestamp is within
    `window` seconds of `now`, for app servers (and tests) to call."""
    sig = headers.get("X-Baton-Signature", "")
    ts = headers.get("X-Baton-Timestamp", "")
    try:
        t = int(ts)
    except ValueError:
        return False
    now = time.time() if now is None else now
    if abs(now - t) > window:
        return False
    # As bytes: compare_digest refuses non-ASCII str, and a forged header may hold any.
    return hmac.compare_digest(sig.encode("utf-8", "surrogateescape"),
                               baton_signature(secret, url, params, ts).encode())


def signed_headers(url: str, form: dict, secret: str | None, twilio: bool,
                   now: float | None = None) -> dict:
    """The signature headers of one request."""
    ts = str(int(time.time() if now is None else now))
    h = {"X-Baton-Timestamp": ts}
    if secret:
        h["X-Baton-Signature"] = baton_signature(secret, url, form, ts)
        if twilio:
            h["X-Twilio-Signature"] = twilio_signature(secret, url, form)
    return h


def with_query(url: str, params: dict) -> str:
    """`url` with `params` added to its query string (GET requests)."""
    parts = urlsplit(url)
    q = parse_qsl(parts.query, keep_blank_values=True)
    q += sorted((str(k), str(v)) for k, v in params.items())
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(q), parts.fragment))


# -- the client ------------------------------------------------------------------

NOT_ALLOWED = "destination not allowed"


class DestinationRefused(OSError):
    """A connection the operator's `[security]` fetch rules do not allow."""


def _guarded_socket(guard):
    """The connector's socket factory: every connection (a name's every address, each
    redirect) is checked against the rules before it is made, so neither DNS nor a
    redirect can lead a document's fetch to loopback, link-local or the engine's own
    ports."""
    import socket

    def factory(addr_info):
        family, type_, proto, _, sockaddr = addr_info
        if guard is not None and guard.fetch_refused(str(sockaddr[0]), int(sockaddr[1])):
            raise DestinationRefused(NOT_ALLOWED)
        return socket.socket(family=family, type=type_, proto=proto)
    return factory


class Fetcher:
    """The engine's HTTP client for instruction apps: one pooled session, signed requests."""

    def __init__(self, *, pool: int = 256, per_host: int = 64, guard=None):
        self.pool = pool
        self.per_host = per_host
        self.guard = guard
        self._session = None
        self.audio = UrlAudio(self._get)
        self.background: set[asyncio.Task] = set()
        # Counters and the last fetch latencies, for the benchmark and the API.
        self.requests = 0
        self.failures = 0
        self.latencies: deque = deque(maxlen=20000)
        self.latency_count = 0

    def _client(self):
        import aiohttp

        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.pool, limit_per_host=self.per_host,
                                             ttl_dns_cache=300, keepalive_timeout=30,
                                             socket_factory=_guarded_socket(self.guard))
            self._session = aiohttp.ClientSession(connector=connector,
                                                  headers={"User-Agent": USER_AGENT},
                                                  auto_decompress=True)
        return self._session

    async def request(self, url: str, method: str = "POST", params: dict | None = None, *,
                      secret: str | None = None, twilio: bool = False,
                      timeout: float = 10.0, connect_timeout: float = 3.0,
                      max_bytes: int = 256 * 1024) -> Response:
        """One request; raises FetchError for a transport failure, a timeout, an
        HTTP status outside 2xx or a body over `max_bytes`."""
        import aiohttp

        import yarl

        params = {str(k): str(v) for k, v in (params or {}).items()}
        method = method.upper()
        try:
            # Sign exactly the bytes that go on the wire: normalise once, send as encoded.
            url = str(yarl.URL(url))
        except (ValueError, TypeError) as exc:
            raise FetchError(f"bad URL {url!r}: {exc}", 11100) from None
        if method == "GET":
            full = with_query(url, params) if params else url
            form: dict = {}
        else:
            full = url
            form = params
        headers = signed_headers(full, form, secret, twilio)
        data = None
        if method == "POST":
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            data = _sorted_body(form).encode()
        t0 = time.monotonic()
        self.requests += 1
        to = aiohttp.ClientTimeout(total=timeout, connect=connect_timeout,
                                   sock_connect=connect_timeout)
        try:
            async with self._client().request(method, yarl.URL(full, encoded=True), data=data,
                                              headers=headers,
                                              timeout=to, allow_redirects=True,
                                              max_redirects=5) as resp:
                length = resp.content_length
                if length is not None and length > max_bytes:
                    raise FetchError(f"response of {length} bytes is over the {max_bytes} "
                                     f"byte limit", 11750, resp.status)
                chunks = []
                got = 0
                async for chunk in resp.content.iter_chunked(65536):
                    got += len(chunk)
                    if got > max_bytes:
                        raise FetchError(f"response is over the {max_bytes} byte limit",
                                         11750, resp.status)
                    chunks.append(chunk)
                body = b"".join(chunks)
                if not 200 <= resp.status < 300:
                    # The status only: nothing of the reply is echoed to the account.
                    raise FetchError(f"HTTP {resp.status}", 11200, resp.status)
                elapsed = time.monotonic() - t0
                self._latency(elapsed)
                return Response(resp.status, body, resp.headers.get("Content-Type", ""),
                                elapsed)
        except FetchError:
            self.failures += 1
            raise
        except asyncio.TimeoutError:
            self.failures += 1
            raise FetchError(f"no complete response within {timeout:g} s", 11205) from None
        except aiohttp.TooManyRedirects:
            self.failures += 1
            raise FetchError("too many HTTP redirects", 11215) from None
        except aiohttp.ClientConnectorDNSError as exc:
            self.failures += 1
            raise FetchError(f"cannot resolve host: {exc}", 11210) from None
        except aiohttp.ClientConnectorError as exc:
            self.failures += 1
            if NOT_ALLOWED in str(exc.os_error or exc):
                raise FetchError(NOT_ALLOWED, 11205) from None
            raise FetchError(f"cannot connect: {exc.os_error or exc}", 11205) from None
        except (aiohttp.ClientError, aiohttp.InvalidURL, ValueError, OSError) as exc:
            self.failures += 1
            raise FetchError(f"request failed: {type(exc).__name__}: {exc}", 11205) from None

    def _latency(self, seconds: float) -> None:
        self.latencies.append(seconds)
        self.latency_count += 1

    async def _get(self, url: str, timeout: float, max_bytes: int) -> bytes:
        return (await self.request(url, "GET", timeout=timeout, max_bytes=max_bytes)).body

    async def audio_url(self, url: str):
        """8 kHz PCM of a WAV at `url` (engine/media/commands/urlaudio.py)."""
        return await self.audio.load(url)

    def fire(self, coro) -> None:
        """Run a request whose answer nobody waits for (status callbacks), kept until done."""
        task = asyncio.get_running_loop().create_task(_quiet(coro))
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def close(self) -> None:
        """Cancel background requests and close the connection pool."""
        for t in list(self.background):
            t.cancel()
        if self.background:
            await asyncio.gather(*self.background, return_exceptions=True)
        await self.audio.close()
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None


async def _quiet(coro) -> None:
    try:
        await coro
    except asyncio.CancelledError:
        raise
    except FetchError as exc:
        log.info("callback request failed: %s", exc)
    except Exception:
        log.exception("callback request failed")
