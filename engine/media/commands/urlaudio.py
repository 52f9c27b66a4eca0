"""Audio from an http(s) URL, for <Play>, the vendor `play`/`gather` commands and services.

One `UrlAudio` per engine (the instructions module's HTTP `Fetcher` owns it, so every
fetch goes through that client's limits, timeouts and address checks). A WAV is
fetched once however many calls ask for it at the same time, decoded to 8 kHz PCM
off the event loop and kept, read-only, in a `PcmCache`: least recently used first
out, bounded by the bytes it holds.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from engine.media import wav
from engine.media.wav import LRU

MAX_CACHE_BYTES = 64 << 20     # decoded PCM kept, all URLs together
MAX_WAV_BYTES = 16 << 20       # one WAV as fetched
FETCH_TIMEOUT = 15.0


class PcmCache(LRU):
    """Decoded audio by key: least recently used out first, bounded by the bytes held
    (an array over a quarter of the budget is not kept)."""

    def __init__(self, max_bytes: int = MAX_CACHE_BYTES, max_items: int = 4096):
        super().__init__(max_items, max_bytes)


class UrlAudio:
    """8 kHz PCM of WAVs at http(s) URLs: fetched with `get(url, timeout, max_bytes)`
    (a coroutine returning the body, raising on failure), decoded off the loop
    (`AudioError` for what is not a playable WAV), cached, shared while loading."""

    def __init__(self, get: Callable[[str, float, int], Awaitable[bytes]],
                 cache: PcmCache | None = None):
        self.get = get
        self.cache = cache if cache is not None else PcmCache()
        self._loads: dict[str, asyncio.Task] = {}

    def cached(self, url: str):
        """The PCM of `url` if it is cached now, else None."""
        return self.cache.get(url)

    async def load(self, url: str, *, timeout: float = FETCH_TIMEOUT,
                   max_bytes: int = MAX_WAV_BYTES):
        pcm = self.cache.get(url)
        if pcm is not None:
            return pcm
        task = self._loads.get(url)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(url, timeout, max_bytes))
            self._loads[url] = task
            task.add_done_callback(lambda t, u=url: self._loaded(u, t))
        # shield: one caller giving up (its call ended) must not cancel the others' load.
        return await asyncio.shield(task)

    def _loaded(self, url: str, task: asyncio.Task) -> None:
        self._loads.pop(url, None)
        # Every waiter may have given up: the failure is theirs to report, not the loop's.
        if not task.cancelled():
            task.exception()

    async def _load(self, url: str, timeout: float, max_bytes: int):
        body = await self.get(url, timeout, max_bytes)
        pcm = await asyncio.get_running_loop().run_in_executor(None, wav.read_wav, body)
        pcm.setflags(write=False)
        self.cache.put(url, pcm)
        return pcm

    async def close(self) -> None:
        """Cancel the loads in flight."""
        pending = list(self._loads.values())
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
