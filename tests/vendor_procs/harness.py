"""Shared set-up of the control API tests: configs, clients, vendor subprocesses."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable

from tests.helpers import ROOT, engine_config, free_port

# The engine forks espeak-ng while gRPC threads run; gRPC's fork handlers are not needed.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

SECRET_A = "acme-secret-0123456789"
SECRET_B = "globex-secret-0123456789"
TOKEN = "demo-token-0123456789abcdef"
OTHER_TOKEN = "other-token-0123456789abcdef"
PROCS = os.path.join(ROOT, "tests", "vendor_procs")


def control_config(**engine) -> dict:
    """An engine config with two vendors (acme, globex), their codes, and API tokens."""
    # A port free for both UDP and TCP: with port 0 the engine takes a UDP port and
    # then wants TCP on the same number, which a gRPC client socket may hold.
    engine.setdefault("sip_addr", f"127.0.0.1:{free_port()}")
    raw = engine_config(**engine)
    raw["vendors"] = {
        "acme": {"secret": SECRET_A, "modules": ["acme.survey", "acme.lookup"],
                 "offer_timeout": 1.0},
        "globex": {"secret": SECRET_B, "modules": ["globex.desk"], "offer_timeout": 1.0},
    }
    raw["modules"] = {"acme.survey": {"vendor": "acme"}, "acme.lookup": {"vendor": "acme"},
                      "globex.desk": {"vendor": "globex"}}
    demo = raw["accounts"]["demo"]
    demo["api_tokens"] = [TOKEN]
    demo["numbers"]["4000"] = {"module": "acme.survey"}
    raw["accounts"]["other"] = {"api_tokens": [OTHER_TOKEN],
                                "numbers": {"4999": {"module": "baton.hold"}}}
    return raw


def with_app(raw: dict, name: str, number: str, nodes: dict, start: str) -> dict:
    raw.setdefault("apps", {})[name] = {"start": start, "nodes": nodes}
    raw["accounts"]["demo"]["numbers"][number] = {"app": name}
    return raw


def target(eng) -> str:
    return f"127.0.0.1:{eng.grpc_port}"


def bearer(token: str = TOKEN) -> tuple:
    return (("authorization", f"Bearer {token}"),)


async def wait_until(cond: Callable[[], bool], timeout: float = 5.0, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(step)
    return cond()


def spawn_vendor(script: str, eng, code: str, secret: str, *args: str) -> subprocess.Popen:
    """A vendor program from tests/vendor_procs/ (or examples/vendors/) as a child process."""
    path = script if os.path.isabs(script) else os.path.join(PROCS, script)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, path, "--engine", target(eng), "--code", code,
                             "--secret", secret, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


async def wait_attached(eng, code: str, n: int = 1, timeout: float = 15.0,
                        proc: subprocess.Popen | None = None) -> None:
    """Wait until `n` processes serve `code` (fail with the child's output if it died)."""
    def ready() -> bool:
        m = eng.control.hub.modules.get(code)
        return m is not None and len(m.processes) >= n

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"vendor process exited {proc.returncode}:\n{proc.stdout.read()}")
        await asyncio.sleep(0.05)
    raise AssertionError(f"{code}: {n} vendor process(es) did not attach")


def stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.stdout.read() if proc.stdout else ""


class RawVendor:
    """A vendor process written against the generated stubs alone, as a vendor in
    another language would (no SDK): one Attach stream, messages in and out."""

    def __init__(self, eng, code: str, secret: str):
        self.addr = target(eng)
        self.code = code
        self.secret = secret
        self.seen: list = []          # every EngineMessage, in order
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._out: asyncio.Queue = asyncio.Queue()

    async def start(self):
        import grpc

        from proto import pb

        mh = pb.module_host_pb2
        self.channel = grpc.aio.insecure_channel(self.addr)
        stub = pb.module_host_pb2_grpc.ModuleHostStub(self.channel)

        async def requests():
            while (msg := await self._out.get()) is not None:
                yield msg

        self.stream = stub.Attach(requests())
        self.send(mh.VendorMessage(register=mh.Register(module_code=self.code,
                                                        secret=self.secret)))
        self.registered = (await self.stream.read()).registered
        self._reader = asyncio.get_running_loop().create_task(self._read())
        return self

    async def _read(self) -> None:
        import grpc

        while (msg := await self.stream.read()) is not grpc.aio.EOF:
            self.seen.append(msg)
            self._inbox.put_nowait(msg)

    def send(self, msg) -> None:
        self._out.put_nowait(msg)

    async def expect(self, kind: str, timeout: float = 5.0):
        """The next EngineMessage of `kind` (offer, ack, event...), skipping others."""
        async def read():
            while True:
                msg = await self._inbox.get()
                if msg.WhichOneof("kind") == kind:
                    return getattr(msg, kind)
        return await asyncio.wait_for(read(), timeout)

    async def close(self) -> None:
        self._out.put_nowait(None)
        self._reader.cancel()
        await self.channel.close()

async def taking_client(eng, code: str, secret: str):
    """A started vendor client that takes every offer: (client, the calls it took)."""
    from control.sdk import VendorClient

    v = VendorClient(target(eng), code, secret)
    calls: list = []

    @v.on_offer
    async def on(offer):
        calls.append(await offer.take())

    await v.start()
    return v, calls


async def taken_call(eng, number: str = "4000", code: str = "acme.survey",
                     secret: str = SECRET_A):
    """A vendor client that took and answered a call from a raw SIP caller to
    `number`: (client, its call, the caller)."""
    from tests.test_sessions import Caller

    v, calls = await taking_client(eng, code, secret)
    caller = Caller(eng, number)
    dial = asyncio.ensure_future(caller.dial())
    await wait_until(lambda: calls)
    await calls[0].answer()
    await dial
    return v, calls[0], caller

