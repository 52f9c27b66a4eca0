"""`baton top --once` against a running engine with a live call, and the
`Sessions.List` RPC it reads (account isolation, limits)."""
from __future__ import annotations

import asyncio
import re
import subprocess
import time

import pytest

pytest.importorskip("ext.rtp", reason="ext.rtp is not built (make build)")

import grpc  # noqa: E402

from proto import pb  # noqa: E402
from engine.cli.top import Frame, Row, render  # noqa: E402
from tests.helpers import BATON, BlockingPeer, EngineProcess, running_engine  # noqa: E402
from tests.test_sessions import Caller  # noqa: E402
from tests.vendor_procs.harness import (OTHER_TOKEN, TOKEN, bearer, control_config,  # noqa: E402
                                        target)

DEMO_TOKEN = "demo-api-token-change-me-0123456789"     # examples/demo.toml
OPERATOR = "top-operator-token-0123456789abcdef0123"
sp = pb.sessions_pb2


def top(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([BATON, "top", "--once", *args], capture_output=True, text=True,
                          timeout=60)


def metrics_url(engine: EngineProcess, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        m = re.search(r"http://127\.0\.0\.1:\d+/metrics", engine.output())
        if m:
            return m.group(0)
        assert time.monotonic() < deadline, engine.output()
        time.sleep(0.1)


def test_top_once_shows_the_live_call():
    engine = EngineProcess(extra=["--metrics-addr", "127.0.0.1:0"])
    with engine:
        url = metrics_url(engine)
        grpc_addr = f"127.0.0.1:{engine.grpc_port}"
        peer = BlockingPeer(engine)
        call = peer.answered_call("1000")
        r = top("--engine", grpc_addr, "--token", DEMO_TOKEN, "--metrics", url)
        assert r.returncode == 0, r.stderr
        rows = [line for line in r.stdout.splitlines() if re.match(r"S[0-9a-f]{14} ", line)]
        assert len(rows) == 1, r.stdout
        fields = rows[0].split()
        assert fields[1:3] == ["demo", "1000"] and "baton.hold" in fields and "basic" in fields
        assert re.search(r" 0:00:\d\d ", rows[0])            # the duration
        # The running cost, or "-" while the accountant cannot say.
        assert re.search(r"( \d+\.\d+ USD| -)$", rows[0]), rows[0]
        assert "calls: 1 live   1 started" in r.stdout
        assert "engine: 1 live" in r.stdout

        # Engine-wide, from /metrics alone: calls by module and level.
        r = top("--metrics", url)
        assert r.returncode == 0, r.stderr
        assert re.search(r"baton\.hold\s+basic\s+1\b", r.stdout), r.stdout

        peer.hang_up(call)
        peer.close()
        r = top("--engine", grpc_addr, "--token", DEMO_TOKEN, "--no-cost")
        assert r.returncode == 0, r.stderr
        assert "(no calls in progress)" in r.stdout and "0 live   1 started" in r.stdout

        r = top("--engine", grpc_addr, "--token", "not-a-token-of-anyone-at-all")
        assert r.returncode == 1 and "refused the token" in r.stderr
        assert engine.stop() == 0


def test_top_names_what_is_missing():
    r = top()
    assert r.returncode == 2 and "--engine" in r.stderr
    r = top("--engine", "127.0.0.1:1")
    assert r.returncode == 2 and "--token" in r.stderr
    r = top("--metrics", "127.0.0.1:9090")
    assert r.returncode == 2 and "http://" in r.stderr


async def test_list_sees_only_the_accounts_live_sessions():
    async with running_engine(control_config()) as eng:
        mine = Caller(eng, "1000")
        theirs = Caller(eng, "4999")
        await mine.dial()
        await theirs.dial()
        async with grpc.aio.insecure_channel(target(eng)) as ch:
            stub = pb.sessions_pb2_grpc.SessionsStub(ch)
            r = await stub.List(sp.ListRequest(), metadata=bearer())
            assert [s.number for s in r.sessions] == ["1000"]
            assert (r.live, r.started_total) == (1, 1)
            s = r.sessions[0]
            assert (s.module, s.level, s.live) == ("baton.hold", "basic", True)
            assert not s.params.fields and r.now_wall_ns >= s.started_wall_ns
            r = await stub.List(sp.ListRequest(), metadata=bearer(OTHER_TOKEN))
            assert [s.number for s in r.sessions] == ["4999"]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.List(sp.ListRequest(limit=20000), metadata=bearer())
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "limit" in err.value.details()
            await mine.bye()
            r = await stub.List(sp.ListRequest(), metadata=bearer())
            assert (len(r.sessions), r.live, r.started_total) == (0, 0, 1)
        await theirs.bye()


async def test_cost_is_a_dash_without_the_accountant():
    async with running_engine(control_config()) as eng:
        caller = Caller(eng, "1000")
        await caller.dial()
        proc = await asyncio.create_subprocess_exec(
            BATON, "top", "--once", "--engine", target(eng), "--token", TOKEN,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        text = out.decode()
        assert proc.returncode == 0, err.decode()
        row = [line for line in text.splitlines() if re.match(r"S[0-9a-f]{14} ", line)]
        assert len(row) == 1 and row[0].endswith(" -"), text
        assert "running cost: the accountant is not answering" in text
        await caller.bye()


def test_render_limits_rows_and_shows_cps():
    f = Frame(taken=0.0, live=3, started=10, cps=2.5,
              rows=[Row(f"S0a1b2c0000000{i}", "1000", "alice", "baton.hold", "basic", "", 61.0)
                    for i in range(3)])
    text = render(f, "engine x", max_rows=2)
    assert "CPS 2.5" in text and "0:01:01" in text and "… and 1 more" in text
    head = next(line for line in text.splitlines() if line.startswith("SESSION"))
    assert head.split()[:3] == ["SESSION", "ACCOUNT", "NUMBER"]
    # Rows line up under the header whatever the account's length.
    f.rows[0].account, f.rows[1].account = "a-very-long-account-name", "b"
    lines = render(f, "engine x").splitlines()
    at = head.index("NUMBER")
    assert [line[at:at + 4] for line in lines if line.startswith("S0a1b2c")] == ["1000"] * 3


async def test_an_operator_token_shows_every_account_with_its_column():
    """An operator token (`[engine] operator_tokens`) lists every account's
    calls; the ACCOUNT column tells them apart."""
    raw = control_config()
    raw["engine"]["operator_tokens"] = [OPERATOR]
    async with running_engine(raw) as eng:
        mine, theirs = Caller(eng, "1000"), Caller(eng, "4999")
        await mine.dial()
        await theirs.dial()
        out = {}
        for name, token in (("operator", OPERATOR), ("demo", TOKEN)):
            proc = await asyncio.create_subprocess_exec(
                BATON, "top", "--once", "--no-cost", "--engine", target(eng), "--token", token,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            stdout, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, err.decode()
            out[name] = stdout.decode()
        rows = {name: sorted(tuple(line.split()[1:3]) for line in text.splitlines()
                             if re.match(r"S[0-9a-f]{14} ", line))
                for name, text in out.items()}
        assert rows["operator"] == [("demo", "1000"), ("other", "4999")], out["operator"]
        assert "calls: 2 live   2 started" in out["operator"]
        assert rows["demo"] == [("demo", "1000")], out["demo"]
        await mine.bye()
        await theirs.bye()
