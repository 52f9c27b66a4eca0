"""Text to speech: espeak-ng renders, cached on disk and in memory by text and voice
(`SpeechCache`), and the mapping of TwiML/Polly/Google voice names onto espeak-ng
voices (`espeak_voice`).
"""
from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import json
import logging
import os
import re
import threading
import uuid
from typing import Hashable

import numpy as np

from engine.media.signals import RATE
from engine.media.wav import LRU, AudioError, readonly, shared_load, write_wav_sync, read_wav

log = logging.getLogger("baton.media.tts")


# --------------------------------------------------------------------------
# Speech


_TWILIO_VOICES = {"man": "m3", "woman": "f3", "alice": "f2"}

# Polly and Google voice names: (gender, language). The name says the language.
_POLLY = {
    "joanna": ("f", "en-US"), "kendra": ("f", "en-US"), "kimberly": ("f", "en-US"),
    "salli": ("f", "en-US"), "ivy": ("f", "en-US"), "ruth": ("f", "en-US"),
    "joey": ("m", "en-US"), "justin": ("m", "en-US"), "kevin": ("m", "en-US"),
    "matthew": ("m", "en-US"), "stephen": ("m", "en-US"),
    "amy": ("f", "en-GB"), "emma": ("f", "en-GB"), "brian": ("m", "en-GB"), "arthur": ("m", "en-GB"),
    "nicole": ("f", "en-AU"), "olivia": ("f", "en-AU"), "russell": ("m", "en-AU"),
    "marlene": ("f", "de-DE"), "vicki": ("f", "de-DE"), "hans": ("m", "de-DE"), "daniel": ("m", "de-DE"),
    "celine": ("f", "fr-FR"), "céline": ("f", "fr-FR"), "lea": ("f", "fr-FR"), "léa": ("f", "fr-FR"),
    "mathieu": ("m", "fr-FR"), "remi": ("m", "fr-FR"), "rémi": ("m", "fr-FR"),
    "conchita": ("f", "es-ES"), "lucia": ("f", "es-ES"), "enrique": ("m", "es-ES"), "sergio": ("m", "es-ES"),
}

_LANGUAGES = {
    "en": "en-us", "en-us": "en-us", "en-gb": "en-gb", "en-au": "en-gb", "en-in": "en-gb",
    "de": "de", "de-de": "de", "fr": "fr", "fr-fr": "fr", "fr-ca": "fr",
    "es": "es", "es-es": "es", "es-mx": "es-419", "es-us": "es-419",
}

_VOICE_RE = re.compile(r"[a-z]{2,3}(-[a-z0-9]{1,8})*")
_VARIANT_RE = re.compile(r"[A-Za-z0-9_]{1,32}")


def _language(language: str) -> str:
    tag = language.strip().replace("_", "-").lower()
    v = _LANGUAGES.get(tag, tag)
    if not _VOICE_RE.fullmatch(v):
        raise AudioError(f"unknown language {language!r}")
    return v


def espeak_voice(voice: str = "en", language: str | None = None) -> str:
    """The espeak-ng voice (``-v``) for a Twilio-style voice and language.

    "man", "woman" and "alice" are espeak-ng variants (en+m3, en+f3, en+f2) of
    the language, which defaults to US English as in TwiML. "Polly.<Name>"
    and "Google.<lang>-..." carry their own language, and a gender picks m3 or
    f3. Anything else is taken as an espeak-ng voice ("en", "de", "en-us+f4");
    with a language given, its language part is replaced and its variant kept.
    Languages are BCP 47 tags ("en-US", "en-GB", "de-DE", "fr-FR", "es-ES"
    map to en-us, en-gb, de, fr, es; other tags are tried lower-cased).
    """
    v = voice.strip()
    low = v.lower()
    if low in _TWILIO_VOICES:
        return f"{_language(language or 'en-US')}+{_TWILIO_VOICES[low]}"
    if low.startswith("polly."):
        name = low[6:].split("-")[0]              # "Polly.Joanna-Neural" is Joanna
        gender, lang = _POLLY.get(name, ("f", language or "en-US"))
        return f"{_language(lang)}+{'m3' if gender == 'm' else 'f3'}"
    if low.startswith("google."):
        # Google.en-US-Standard-C: the language is the first two parts.
        parts = v[7:].split("-")
        lang = "-".join(parts[:2]) if len(parts) >= 2 else (language or "en-US")
        return f"{_language(lang)}+f3"
    base, _, variant = low.partition("+")
    variant = v.partition("+")[2]                 # variant file names are case-sensitive
    if language:
        base = _language(language)
    if not _VOICE_RE.fullmatch(base) or (variant and not _VARIANT_RE.fullmatch(variant)):
        raise AudioError(f"unknown voice {voice!r}")
    return f"{base}+{variant}" if variant else base


_CACHE_FORMAT = 1     # bump when rendering changes, so old cache files are not reused
_NO_VOICE = b"voice does not exist"


async def _run(cmd: list[str], stdin: bytes | None, timeout: float) -> tuple[int, bytes, bytes]:
    """Run a program without blocking the loop; kill it on timeout or cancellation."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    except OSError as e:
        raise AudioError(f"cannot run {cmd[0]}: {e.strerror or e}") from e
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise AudioError(f"{cmd[0]} took longer than {timeout:g} s") from None
    except BaseException:
        if proc.returncode is None:
            proc.kill()
        raise
    return proc.returncode or 0, out, err


class SpeechCache:
    """Text to 8 kHz speech with espeak-ng, cached on disk and in memory.

    Rendered audio is stored as an 8 kHz WAV named by a hash of (text, espeak
    voice, rate, pitch) in cache_dir; the most recent results are also kept in
    memory. Identical concurrent requests share one rendering; at most
    max_concurrent espeak-ng processes run at once. The files on disk are
    bounded by `disk_bytes`: past it the least recently used go first (any
    caller's text lands here, so an unbounded cache would fill the disk).
    Counters: `characters`
    (text characters rendered by espeak-ng, i.e. cache misses), `renders`
    (espeak-ng runs) and `hits` (requests served from a cache).
    """

    def __init__(self, cache_dir: str | os.PathLike[str], max_concurrent: int = 2,
                 espeak: str = "espeak-ng", *, timeout: float = 30.0, max_chars: int = 4000,
                 memory_items: int = 64, memory_bytes: int = 32 << 20,
                 disk_bytes: int = 64 << 20) -> None:
        self.cache_dir = os.path.abspath(os.fspath(cache_dir))
        self.disk_bytes = disk_bytes
        self._disk: collections.OrderedDict | None = None   # file name -> size, oldest first
        self._disk_total = 0
        self._disk_lock = threading.Lock()
        self.espeak = espeak
        self.timeout = timeout
        self.max_chars = max_chars
        self.characters = 0
        self.renders = 0
        self.hits = 0
        self._sem = asyncio.Semaphore(max_concurrent)
        # One tenant may hold all but one espeak-ng slot, so another tenant's prompt
        # never waits behind a flood of someone else's renderings.
        self.per_tenant = max(1, max_concurrent - 1)
        self._tenant_sems: dict[str, asyncio.Semaphore] = {}
        self._memory = LRU(memory_items, memory_bytes)
        self._inflight: dict[Hashable, asyncio.Task] = {}
        self._variants: frozenset[str] | None = None

    def path_for(self, text: str, voice: str = "en", rate_wpm: int = 160,
                 pitch: int | None = None, language: str | None = None) -> str:
        """The cache file a request is (or would be) stored in."""
        return os.path.join(self.cache_dir, self._key(text, espeak_voice(voice, language), rate_wpm, pitch) + ".wav")

    @staticmethod
    def _key(text: str, voice: str, rate: int, pitch: int | None) -> str:
        blob = json.dumps([_CACHE_FORMAT, text, voice, rate, pitch], ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:40]

    async def say(self, text: str, voice: str = "en", rate_wpm: int = 160,
                  pitch: int | None = None, language: str | None = None,
                  tenant: str | None = None) -> np.ndarray:
        """Speech for text as 8 kHz int16 (read-only, shared: copy to modify).

        voice and language are mapped by `espeak_voice`. rate_wpm is 80..450,
        pitch 0..99 (espeak-ng's default 50 when None). Raises AudioError for
        empty or over-long text, an unknown voice, or a failed or timed-out
        rendering. `tenant` (an account) may hold at most `per_tenant` of the
        espeak-ng slots at once.
        """
        if not isinstance(text, str) or not text.strip():
            raise AudioError("nothing to say: empty text")
        if len(text) > self.max_chars:
            raise AudioError(f"text is {len(text)} characters, over the {self.max_chars} limit")
        if not 80 <= rate_wpm <= 450:
            raise AudioError(f"speaking rate {rate_wpm} wpm is outside 80..450")
        if pitch is not None and not 0 <= pitch <= 99:
            raise AudioError(f"pitch {pitch} is outside 0..99")
        ev = espeak_voice(voice, language)
        key = self._key(text, ev, int(rate_wpm), pitch)
        pcm = self._memory.get(key)
        if pcm is not None:
            self.hits += 1
            return pcm
        return await shared_load(self._inflight, key,
                             lambda: self._fetch(key, text, voice, ev, int(rate_wpm), pitch,
                                                 tenant))

    async def _fetch(self, key: str, text: str, voice: str, ev: str, rate: int,
                     pitch: int | None, tenant: str | None = None) -> np.ndarray:
        loop = asyncio.get_running_loop()
        path = os.path.join(self.cache_dir, key + ".wav")
        pcm = await loop.run_in_executor(None, _read_cached, path)
        if pcm is not None:
            self.hits += 1
            await loop.run_in_executor(None, self._disk_used, path)
        else:
            pcm = await self._render(text, voice, ev, rate, pitch, key, tenant)
            try:
                await loop.run_in_executor(None, write_wav_sync, path, pcm, RATE)
                await loop.run_in_executor(None, self._disk_used, path)
            except OSError as e:
                # Still playable; only the disk cache misses out.
                log.warning("speech cache: cannot write %s: %s", path, e)
        self._memory.put(key, readonly(pcm))
        return pcm

    def _disk_used(self, path: str) -> None:
        """Note a use of a cache file and remove the least recently used ones past
        `disk_bytes` (runs off the loop)."""
        with self._disk_lock:
            if self._disk is None:
                entries = []
                with os.scandir(self.cache_dir) as it:
                    for e in it:
                        if e.name.endswith(".wav") and not e.name.startswith("."):
                            st = e.stat()
                            entries.append((st.st_mtime_ns, e.name, st.st_size))
                self._disk = collections.OrderedDict((n, s) for _, n, s in sorted(entries))
                self._disk_total = sum(self._disk.values())
            name = os.path.basename(path)
            try:
                size = os.stat(path).st_size
            except OSError:
                return
            self._disk_total += size - self._disk.pop(name, 0)
            self._disk[name] = size
            while self._disk_total > self.disk_bytes and len(self._disk) > 1:
                old, old_size = self._disk.popitem(last=False)
                self._disk_total -= old_size
                try:
                    os.unlink(os.path.join(self.cache_dir, old))
                except OSError:
                    pass

    async def _render(self, text: str, voice: str, ev: str, rate: int, pitch: int | None,
                      key: str, tenant: str | None = None) -> np.ndarray:
        await self._check_variant(voice, ev)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, functools.partial(os.makedirs, self.cache_dir, exist_ok=True))
        tmp = os.path.join(self.cache_dir, f".render-{key}-{uuid.uuid4().hex}.wav")
        cmd = [self.espeak, "-v", ev, "-s", str(rate)]
        if pitch is not None:
            cmd += ["-p", str(int(pitch))]
        # Text on stdin, not argv: it stays out of `ps` and cannot look like an option.
        cmd += ["-w", tmp, "--stdin"]
        try:
            mine = self._tenant_sems.get(tenant or "")
            if mine is None:
                mine = self._tenant_sems[tenant or ""] = asyncio.Semaphore(self.per_tenant)
            async with mine, self._sem:
                self.renders += 1
                rc, _, err = await _run(cmd, text.encode("utf-8"), self.timeout)
            if rc != 0:
                if _NO_VOICE in err:
                    raise AudioError(f"unknown voice {voice!r}: espeak-ng has no voice {ev!r}")
                detail = err.decode("utf-8", "replace").strip()[-300:]
                raise AudioError(f"espeak-ng failed (exit {rc}) for voice {ev!r}: {detail}")
            try:
                pcm = await loop.run_in_executor(None, read_wav, tmp)
            except AudioError as e:
                raise AudioError(f"espeak-ng output unreadable: {e}") from None
        finally:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        self.characters += len(text)
        return pcm

    async def _check_variant(self, voice: str, ev: str) -> None:
        # espeak-ng silently ignores an unknown "+variant" and speaks with the
        # default one, so check variants against the installed list.
        variant = ev.partition("+")[2]
        if not variant:
            return
        if self._variants is None:
            try:
                rc, out, _ = await _run([self.espeak, "--voices=variant"], None, self.timeout)
            except AudioError:
                rc, out = 1, b""
            names = re.findall(rb"!v/(\S+)", out) if rc == 0 else []
            # An empty list means espeak-ng could not tell us: do not block on it.
            self._variants = frozenset(n.decode() for n in names)
        if self._variants and variant not in self._variants:
            raise AudioError(f"unknown voice {voice!r}: espeak-ng has no variant {variant!r}")


def _read_cached(path: str) -> np.ndarray | None:
    """A cached rendering, or None when absent or unusable (an unusable one is removed)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("speech cache: cannot read %s: %s", path, e)
        return None
    try:
        return read_wav(data)
    except AudioError as e:
        log.warning("speech cache: discarding %s: %s", path, e)
        try:
            os.unlink(path)
        except OSError:
            pass
        return None
