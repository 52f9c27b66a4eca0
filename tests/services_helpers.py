"""What the service-module tests share: an engine run by its own CLI with a
small config, its gRPC API with the account's token, a Watch stream collected
in the background, and the PJSIP endpoint of tests/pjsip_keys.py."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys

# Calls and gRPC streams run on the same loop, which forks the PJSIP children:
# gRPC's fork handlers are not needed (the children never use gRPC) and can
# crash a child that forks while a gRPC thread is busy.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import grpc  # noqa: E402

from tests.helpers import ROOT, EngineProcess

TOKEN = "services-test-token-0123456789"
OTHER_TOKEN = "services-other-token-0123456789"
PEER = os.path.join(ROOT, "tests", "pjsip_keys.py")

BASE = f"""
[media]
address = "127.0.0.1"

[accounts.demo]
api_tokens = ["{TOKEN}"]

[accounts.other]
api_tokens = ["{OTHER_TOKEN}"]
"""


def write_config(tmp_path, body: str, numbers: dict[str, str]) -> str:
    """A config: the base accounts, `body` (apps), and demo's numbers."""
    lines = [BASE, body, "[accounts.demo.numbers]"]
    lines += [f'"{n}" = {route}' for n, route in numbers.items()]
    path = tmp_path / "services.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def engine_process(config: str) -> EngineProcess:
    """`baton serve` with `config` (no accountant); use it as a context manager."""
    return EngineProcess(config, extra=["--no-accountant"])


async def prerender(engine: EngineProcess, *texts: str, voice: str = "en") -> dict:
    """Speak `texts` into the engine's speech cache before calls need them (so a
    busy machine cannot delay a prompt past a key), and return their PCM."""
    from engine.media.tts import SpeechCache

    cache = SpeechCache(os.path.join(engine.data_dir, "tts"))
    return {t: await cache.say(t, voice=voice) for t in texts}


def correlation(part, recording) -> float:
    """The best normalized correlation of `part` anywhere in `recording`
    (1.0 for an exact scaled copy)."""
    import numpy as np

    a = np.asarray(part, dtype=np.float64)
    b = np.asarray(recording, dtype=np.float64)
    # Without the part's quiet ends: a call may end as the last word does.
    loud = np.nonzero(np.abs(a) > 64)[0]
    if len(loud):
        a = a[loud[0]:loud[-1] + 1]
    n = len(a)
    if len(b) < n or not a.any():
        return 0.0
    size = 1 << int(np.ceil(np.log2(n + len(b))))
    num = np.fft.irfft(np.conj(np.fft.rfft(a, size)) * np.fft.rfft(b, size), size)[:len(b) - n + 1]
    energy = np.concatenate(([0.0], np.cumsum(b * b)))
    window = energy[n:] - energy[:len(b) - n + 1]
    r = num / np.sqrt(np.sum(a * a) * np.maximum(window, 1e-9))
    return float(r.max())


def heard_clearly(part, recording, window: int = 2400) -> float:
    """How clearly `part` was heard in `recording`: the best correlation of any
    300 ms window of it. A receiver's jitter buffer may stretch, drop or conceal a
    few frames under load, which lowers a whole-prompt correlation; a window is
    short enough to fall between such repairs and long enough not to match other
    speech."""
    import numpy as np

    a = np.asarray(part)
    loud = np.nonzero(np.abs(a) > 64)[0]
    if len(loud):
        a = a[loud[0]:loud[-1] + 1]
    if len(a) <= window:
        return correlation(a, recording)
    starts = range(0, len(a) - window + 1, window // 2)
    return max(correlation(a[i:i + window], recording) for i in starts)


def read_wav(path):
    import numpy as np
    import wave

    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (8000, 1, 2), path
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float64)


def metadata(token: str = TOKEN):
    return (("authorization", f"Bearer {token}"),)


@contextlib.asynccontextmanager
async def control(engine: EngineProcess):
    """A grpc.aio channel to the engine's control API."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{engine.grpc_port}") as ch:
        await asyncio.wait_for(ch.channel_ready(), 10)
        yield ch


class Watcher:
    """Every session event of the account, collected while the test runs."""

    def __init__(self, channel):
        from proto import pb

        self.stub = pb.sessions_pb2_grpc.SessionsStub(channel)
        self.pb = pb
        self.events: list = []
        self._task = None
        self._ready = asyncio.Event()

    async def __aenter__(self):
        self._task = asyncio.get_running_loop().create_task(self._run())
        # The first Watch needs the stream open before calls start.
        await asyncio.sleep(0.3)
        return self

    async def _run(self):
        call = self.stub.Watch(self.pb.sessions_pb2.WatchRequest(), metadata=metadata())
        try:
            async for ev in call:
                self.events.append(ev)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass

    async def __aexit__(self, *exc):
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def of(self, kind: str) -> list:
        return [e for e in self.events if e.kind == kind]

    def details(self, kind: str) -> list[dict]:
        return [self.pb.from_struct(e.detail) for e in self.of(kind)]

    async def wait(self, cond, timeout: float = 10.0, what: str = "an event"):
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not cond():
            if loop.time() > end:
                raise AssertionError(f"timed out waiting for {what}: "
                                     f"{[(e.kind, e.session_id) for e in self.events]}")
            await asyncio.sleep(0.05)


async def peer(scenario: str, *args: str, engine: EngineProcess | None = None,
               log=None, ready=None, timeout: float = 60) -> dict:
    """Run tests/pjsip_keys.py; `ready(port)` is awaited once an `answer` peer listens."""
    cmd = [sys.executable, PEER, scenario, *args]
    if engine is not None:
        cmd += ["--engine", f"127.0.0.1:{engine.port}"]
    if log is not None:
        cmd += ["--log", str(log)]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, cwd=ROOT)
    lines = []

    async def read():
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            lines.append(line)
            if line.startswith("READY ") and ready is not None:
                await ready(int(line.split()[1]))

    try:
        await asyncio.wait_for(asyncio.gather(read(), proc.wait()), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"the PJSIP peer hung:\n{lines}\n{_tail(log)}") from None
    err = (await proc.stderr.read()).decode(errors="replace")
    results = [ln for ln in lines if ln.startswith("RESULT ")]
    context = f"exit {proc.returncode}\nstdout: {lines}\nstderr: {err[-3000:]}\nlog:\n{_tail(log)}"
    assert results, f"the PJSIP peer printed no result\n{context}"
    result = json.loads(results[-1][len("RESULT "):])
    assert "error" not in result, f"{result['error']}\n{result.get('traceback')}\n{context}"
    result["_context"] = context
    return result


def _tail(path, n: int = 6000) -> str:
    if path is None:
        return ""
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return "(no log)"


def finish(engine: EngineProcess) -> str:
    """Stop the engine; it must stop cleanly with no traceback logged."""
    code = engine.stop()
    out = engine.output()
    assert code == 0, f"engine exited with {code}:\n{out[-4000:]}"
    assert "Traceback" not in out, out[-6000:]
    return out
