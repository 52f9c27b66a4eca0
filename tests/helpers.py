"""Helpers for tests that talk to a real engine over loopback."""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATON = os.path.join(ROOT, ".venv", "bin", "baton")
if not os.path.exists(BATON):
    BATON = os.path.join(os.path.dirname(sys.executable), "baton")
DEMO = os.path.join(ROOT, "examples", "demo.toml")


def free_port(kind=socket.SOCK_DGRAM, host="127.0.0.1", even=False) -> int:
    """A port free for both UDP and TCP. `even`: an even port whose next three are
    free for UDP too, for a media base port (SIPp binds audio RTP/RTCP at -mp and
    video at -mp + 2)."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(200):
        with contextlib.ExitStack() as held:
            u = held.enter_context(socket.socket(fam, socket.SOCK_DGRAM))
            u.bind((host, 0))
            port = u.getsockname()[1]
            if even and (port % 2 or port > 65531):
                continue
            try:
                t = held.enter_context(socket.socket(fam, socket.SOCK_STREAM))
                t.bind((host, port))
                for nxt in range(port + 1, port + 4) if even else ():
                    held.enter_context(socket.socket(fam, socket.SOCK_DGRAM)).bind((host, nxt))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def engine_config(**engine) -> dict:
    """A config dict like the demo's, on free ports, for in-process engines."""
    base = 30000 + (os.getpid() * 97 % 20000)
    base -= base % 2
    cfg = {
        "engine": {"sip_addr": engine.pop("sip_addr", "127.0.0.1:0"),
                   "grpc_addr": engine.pop("grpc_addr", "127.0.0.1:0"),
                   "transports": ["udp", "tcp"], "data_dir": tempfile.mkdtemp(prefix="baton-")},
        "media": {"address": "127.0.0.1", "rtp_port_min": base, "rtp_port_max": base + 2000},
        "accounts": {"demo": {"numbers": {"1000": {"module": "baton.hold"}}}},
    }
    cfg["engine"].update(engine)
    return cfg


@contextlib.asynccontextmanager
async def running_engine(raw: dict | None = None, **engine_kw):
    """An Engine in this process and loop; yields it once listening."""
    from engine.config.load import from_dict
    from engine.runtime.server import Engine

    cfg = from_dict(raw or engine_config(**engine_kw), "<test>")
    eng = Engine(cfg)
    await eng.start()
    try:
        yield eng
    finally:
        await eng.stop(timeout=1.0)


def _has_http_addr(config: str) -> bool:
    """Whether a config file sets [engine] http_addr (the demo's and its copies)."""
    try:
        with open(config) as f:
            return re.search(r"^http_addr\s*=", f.read(), re.M) is not None
    except OSError:
        return False


class EngineProcess:
    """`baton serve` as a child process (the real CLI), stopped with SIGTERM."""

    def __init__(self, config: str = DEMO, host: str = "127.0.0.1", port: int | None = None,
                 extra: list | None = None, netns: str | None = None, env: dict | None = None):
        self.host = host
        self.port = port or free_port(host=host)
        self.data_dir = tempfile.mkdtemp(prefix="baton-data-")
        hp = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        self.grpc_port = free_port(socket.SOCK_STREAM)
        cmd = [BATON, "serve", "--config", config, "--sip-addr", hp, "--data-dir", self.data_dir,
               "--grpc-addr", f"127.0.0.1:{self.grpc_port}"]
        if _has_http_addr(config):
            # The demo's HTTP port is fixed (8080): tests take any free one.
            cmd += ["--http-addr", f"{host}:0" if ":" not in host else f"[{host}]:0"]
        cmd += extra or []
        if netns:
            cmd = ["ip", "netns", "exec", netns] + cmd
        self.log = tempfile.NamedTemporaryFile(prefix="baton-log-", suffix=".txt", delete=False)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        self.netns = netns

    def wait_ready(self, timeout: float = 15.0) -> "EngineProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"engine exited early:\n{self.output()}")
            if self.netns or self._options_answered():
                if self.netns:
                    time.sleep(1.0)
                # SIP answers as soon as it listens; the banner comes once the gRPC,
                # HTTP and metrics servers and the accountant are up too.
                if " serving SIP on " in self.output() or self.netns:
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"engine did not answer OPTIONS:\n{self.output()}")

    def _options_answered(self) -> bool:
        fam = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.bind((self.host, 0))
            s.settimeout(0.3)
            s.sendto(options(self.host, self.port, s.getsockname()[1]), (self.host, self.port))
            try:
                data = s.recv(65535)
            except OSError:
                return False
            return data.startswith(b"SIP/2.0 200")

    def output(self) -> str:
        with open(self.log.name, "r", errors="replace") as f:
            return f.read()

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"engine did not stop within {timeout}s:\n{self.output()}")
        return self.proc.returncode

    def __enter__(self):
        return self.wait_ready()

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def pg_store(prefix: str):
    """A schema of its own in the test PostgreSQL (the test is skipped when there is
    none): yields (store URL, schema name) and drops the schema afterwards."""
    import pytest

    from tests.test_accounting_ledger import PG_URL, _drop_schema, _pg_unreachable

    reason = _pg_unreachable()
    if reason:
        pytest.skip(reason)
    schema = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        yield f"{PG_URL}?schema={schema}", schema
    finally:
        _drop_schema(schema)


@contextlib.contextmanager
def two_nodes(config: str, store: str):
    """Two `baton serve` nodes of one cluster posting into the PostgreSQL ledger STORE:
    n1 on 127.0.0.11 and n2 on 127.0.0.12 (their media too); yields them once ready."""
    nodes = []
    try:
        for i, host in enumerate(("127.0.0.11", "127.0.0.12")):
            nodes.append(EngineProcess(config, host=host, extra=[
                "--grpc-addr", f"{host}:{free_port(socket.SOCK_STREAM, host=host)}",
                "--node-id", f"n{i + 1}", "--media-addr", host, "--store", store]))
        for n in nodes:
            n.wait_ready(30)
        yield nodes
    finally:
        for n in nodes:
            try:
                n.stop(20)
            finally:
                n.__exit__()


@contextlib.contextmanager
def served_demo():
    """`baton serve` with the demo config, checked to stop cleanly without a traceback."""
    with EngineProcess() as eng:
        yield eng
        code = eng.stop()
        assert code == 0, eng.output()
        assert "Traceback" not in eng.output(), eng.output()


def _hp(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def options(host, port, local_port, local_host="127.0.0.1", transport="UDP") -> bytes:
    branch = "z9hG4bK" + secrets.token_hex(6)
    return (f"OPTIONS sip:{_hp(host, port)} SIP/2.0\r\n"
            f"Via: SIP/2.0/{transport} {_hp(local_host, local_port)};branch={branch}\r\n"
            f"Max-Forwards: 70\r\nTo: <sip:{_hp(host, port)}>\r\n"
            f"From: <sip:probe@{_hp(local_host, local_port)}>;tag={secrets.token_hex(4)}\r\n"
            f"Call-ID: {secrets.token_hex(8)}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n").encode()


SDP_OFFER = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
             "m=audio {port} RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n"
             "a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=sendrecv\r\n")


class Call:
    """The dialog state a raw test UAC keeps for one call."""

    def __init__(self, client, number="1000", transport="UDP"):
        self.client = client
        self.number = number
        self.call_id = secrets.token_hex(8) + "@test"
        self.from_tag = secrets.token_hex(4)
        self.to_tag = None
        self.cseq = 1
        self.transport = transport
        self.branch = None

    def request(self, method, body="", cseq=None, branch=None, extra="", to_tag=True,
                uri=None, content_type="application/sdp") -> bytes:
        c = self.client
        self.branch = branch or ("z9hG4bK" + secrets.token_hex(6))
        to = f"<sip:{self.number}@{_hp(c.host, c.port)}>"
        if to_tag and self.to_tag:
            to += f";tag={self.to_tag}"
        cseq = cseq if cseq is not None else self.cseq
        ruri = uri or f"sip:{self.number}@{_hp(c.host, c.port)}"
        head = (f"{method} {ruri} SIP/2.0\r\n"
                f"Via: SIP/2.0/{self.transport} {_hp(c.local_host, c.local_port)};branch={self.branch}\r\n"
                f"Max-Forwards: 70\r\nTo: {to}\r\n"
                f"From: \"Test\" <sip:tester@{_hp(c.local_host, c.local_port)}>;tag={self.from_tag}\r\n"
                f"Call-ID: {self.call_id}\r\nCSeq: {cseq} {method if method != 'ACK' or cseq else method}\r\n"
                f"Contact: <sip:tester@{_hp(c.local_host, c.local_port)}>\r\n{extra}")
        b = body.encode()
        if b:
            head += f"Content-Type: {content_type}\r\n"
        return (head + f"Content-Length: {len(b)}\r\n\r\n").encode() + b


class UdpClient:
    """A raw UDP SIP peer: send bytes, receive parsed responses/requests."""

    def __init__(self, host, port, local_host=None):
        self.host = host
        self.port = port
        self.local_host = local_host or host
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(fam, socket.SOCK_DGRAM)
        self.sock.bind((self.local_host, 0))
        self.sock.setblocking(False)
        self.local_port = self.sock.getsockname()[1]

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, (self.host, self.port))

    async def recv(self, timeout: float = 2.0):
        from ext.sip_py import parse_message

        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(self.sock, 65535), timeout)
        return parse_message(data)

    async def expect(self, status: int, timeout: float = 2.0, skip_provisional=True):
        while True:
            m = await self.recv(timeout)
            if m.is_request:
                continue
            if skip_provisional and m.status < 200 and status >= 200:
                continue
            assert m.status == status, f"expected {status}, got {m.status} {m.reason}"
            return m

    async def silent(self, timeout: float = 0.6) -> bool:
        try:
            m = await self.recv(timeout)
        except asyncio.TimeoutError:
            return True
        raise AssertionError(f"unexpected message {m!r}")

    def close(self):
        self.sock.close()


class BlockingPeer:
    """A blocking UDP SIP caller for tests that drive `baton serve` from plain code."""

    def __init__(self, engine: "EngineProcess", timeout: float = 3.0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(timeout)
        self.host, self.port = engine.host, engine.port
        self.local_host, self.local_port = "127.0.0.1", self.sock.getsockname()[1]

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, (self.host, self.port))

    def recv(self):
        from ext.sip_py import parse_message

        return parse_message(self.sock.recv(65535))

    def invite(self, number: str = "1000") -> "Call":
        """Send an INVITE; final_status() reads its answer."""
        call = Call(self, number)
        self.send(call.request("INVITE", SDP_OFFER.format(port=40000)))
        return call

    def final_status(self, call: "Call") -> int:
        """The INVITE's final status (provisional answers skipped); a 200 is acknowledged."""
        while True:
            m = self.recv()
            if not m.is_request and m.status >= 200:
                break
        if m.status == 200:
            call.to_tag = m.to_tag
            self.send(call.request("ACK"))
        return m.status

    def answered_call(self, number: str = "1000") -> "Call":
        """INVITE, wait for the 200 (provisional answers skipped), ACK."""
        call = self.invite(number)
        status = self.final_status(call)
        assert status == 200, f"expected 200, got {status}"
        return call

    def hang_up(self, call: "Call") -> None:
        """BYE, and wait for its answer."""
        call.cseq += 1
        self.send(call.request("BYE"))
        while True:
            m = self.recv()
            if not m.is_request and m.cseq_method == "BYE":
                return

    def close(self) -> None:
        self.sock.close()


def invite(engine: EngineProcess, number: str) -> tuple[BlockingPeer, Call]:
    """A BlockingPeer of its own (5 s timeout) sends ENGINE an INVITE to NUMBER."""
    peer = BlockingPeer(engine, timeout=5)
    return peer, peer.invite(number)


def bye_answered(calls: list[tuple[BlockingPeer, Call]], statuses: list[int]) -> None:
    """Send BYE on each of CALLS whose INVITE was answered 200 (its final status)."""
    for (peer, call), status in zip(calls, statuses):
        if status == 200:
            call.cseq += 1
            peer.send(call.request("BYE"))


def period_now() -> str:
    """The billing period that billing's clock reads now: fixed for the whole
    run by tests/conftest.py, whatever today's date."""
    from engine.accounting.config import PeriodClock

    return PeriodClock().now()
