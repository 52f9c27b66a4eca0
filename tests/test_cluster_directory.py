"""The cluster's session directory in Redis (issue 19, docs/cluster.md): two real
`baton serve` nodes on 127.0.0.11 and .12 share one Redis; control requests about a
session sent to the node that does not hold it are forwarded to the owner (or answered
with where it lives), the entry goes when the call ends, and a lost Redis loses no call."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
import uuid

import grpc
import pytest

from proto import pb
from tests.helpers import BATON, DEMO, BlockingPeer, EngineProcess, free_port

pytestmark = pytest.mark.kernels_only

REDIS_URL = "redis://127.0.0.1:6379/0"
TOKEN = "demo-api-token-change-me-0123456789"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
REST_SID = "AC0000000000000000000000000000demo"
REST_AUTH = (REST_SID, "demo-auth-token-change-me-0123456789")
sp = pb.sessions_pb2


def _redis_unreachable() -> str | None:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1) as s:
            s.sendall(b"PING\r\n")
            if not s.recv(64).startswith(b"+PONG"):
                return "Redis on 127.0.0.1:6379 does not answer PING"
    except OSError as exc:
        return f"no Redis on 127.0.0.1:6379: {exc}"
    return None


@pytest.fixture
def prefix():
    reason = _redis_unreachable()
    if reason:
        pytest.skip(reason)
    p = f"baton-test:{os.getpid()}:{uuid.uuid4().hex[:8]}:"
    yield p
    import redis

    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(match=p + "*"))
    if keys:
        r.delete(*keys)
    r.close()


def _redis():
    import redis

    return redis.Redis.from_url(REDIS_URL, decode_responses=True)


def _node(host: str, node: str, prefix: str, config: str = DEMO,
          redis_url: str = REDIS_URL) -> tuple[EngineProcess, str]:
    grpc_addr = f"{host}:{free_port(socket.SOCK_STREAM, host=host)}"
    http_addr = f"{host}:{free_port(socket.SOCK_STREAM, host=host)}"
    e = EngineProcess(config, host=host, extra=[
        "--grpc-addr", grpc_addr, "--node-id", node, "--media-addr", host,
        "--redis", redis_url, "--cluster-prefix", prefix, "--http-addr", http_addr])
    e.rest = http_addr
    return e, grpc_addr


@pytest.fixture
def two_nodes(prefix):
    n1, g1 = _node("127.0.0.11", "n1", prefix)
    n2, g2 = _node("127.0.0.12", "n2", prefix)
    try:
        _ready((n1, g1), (n2, g2))
        yield (n1, g1), (n2, g2)
    finally:
        for n in (n1, n2):
            try:
                n.stop(20)
            finally:
                n.__exit__()


def _ready(*nodes: tuple[EngineProcess, str]) -> None:
    """SIP answers first; the gRPC API (and the directory) start just after."""
    for engine, grpc_addr in nodes:
        engine.wait_ready(30)
        with grpc.insecure_channel(grpc_addr) as ch:
            grpc.channel_ready_future(ch).result(timeout=30)


def _wait(pred, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _retry_unavailable(rpc, timeout: float = 30.0):
    """The accountant child starts beside the engine: its answers may wait for it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return rpc()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_a_transition_and_a_cost_query_sent_to_the_wrong_node_work(two_nodes, prefix):
    (n1, g1), (n2, g2) = two_nodes
    r = _redis()
    peer = BlockingPeer(n1)
    try:
        call = peer.answered_call("1000")
        with grpc.insecure_channel(g1) as ch:
            sessions = pb.sessions_pb2_grpc.SessionsStub(ch).List(sp.ListRequest(),
                                                                  metadata=AUTH).sessions
        assert len(sessions) == 1
        sid = sessions[0].session_id
        entry = _wait(lambda: r.get(f"{prefix}session:{sid}"), "the directory entry")
        assert json.loads(entry) == {"node": "n1", "grpc": g1, "http": n1.rest}
        assert 0 < r.pttl(f"{prefix}session:{sid}") <= 30_000
        listed = subprocess.run([BATON, "sessions", "list", "--cluster", REDIS_URL, "--prefix",
                                 prefix, "--format", "json"], capture_output=True, text=True,
                                check=True)
        assert json.loads(listed.stdout) == [{"id": sid, "node": "n1", "grpc": g1}]

        with grpc.insecure_channel(g2) as ch:
            stub = pb.sessions_pb2_grpc.SessionsStub(ch)
            # Node 2 does not hold the call: it asks node 1 and answers for it.
            info = stub.Get(sp.GetRequest(session_id=sid), metadata=AUTH)
            assert info.live and info.module == "baton.hold"
            moved = stub.Transition(sp.TransitionRequest(session_id=sid, target="baton.echo"),
                                    metadata=AUTH)
            assert moved.session.session_id == sid
            cost = _retry_unavailable(lambda: stub.Cost(sp.CostRequest(session_id=sid),
                                                        metadata=AUTH))
            assert cost.session_id == sid and cost.live and cost.currency
            history = stub.History(sp.HistoryRequest(session_id=sid), metadata=AUTH)
            assert [s.module for s in history.spans][-2:] == ["baton.hold", "baton.echo"]
            # The caller's credentials travel with the request: a wrong token stays wrong.
            with pytest.raises(grpc.RpcError) as err:
                stub.Get(sp.GetRequest(session_id=sid),
                         metadata=(("authorization", "Bearer not-a-token-0123456789"),))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # The owner really moved the call.
        with grpc.insecure_channel(g1) as ch:
            info = pb.sessions_pb2_grpc.SessionsStub(ch).Get(sp.GetRequest(session_id=sid),
                                                            metadata=AUTH)
            assert info.module == "baton.echo"

        peer.hang_up(call)
        _wait(lambda: r.get(f"{prefix}session:{sid}") is None, "the entry outlived the call")
        with grpc.insecure_channel(g2) as ch:
            with pytest.raises(grpc.RpcError) as err:
                pb.sessions_pb2_grpc.SessionsStub(ch).Transition(
                    sp.TransitionRequest(session_id=sid, target="baton.hold"), metadata=AUTH)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        peer.close()
        r.close()


def test_rest_requests_sent_to_the_wrong_node_are_forwarded(two_nodes, prefix):
    import requests

    (n1, g1), (n2, _g2) = two_nodes
    r = _redis()
    peer = BlockingPeer(n1)
    base = f"http://{n2.rest}/2010-04-01/Accounts/{REST_SID}/Calls"
    try:
        call = peer.answered_call("1000")
        with grpc.insecure_channel(g1) as ch:
            sid = pb.sessions_pb2_grpc.SessionsStub(ch).List(
                sp.ListRequest(), metadata=AUTH).sessions[0].session_id
        _wait(lambda: r.get(f"{prefix}session:{sid}"), "the directory entry")
        # Node 2 does not hold the call: node 1 answers through it.
        got = requests.get(f"{base}/{sid}.json", auth=REST_AUTH, timeout=15)
        assert got.status_code == 200 and got.json()["status"] == "in-progress"
        assert got.headers["baton-forwarded"] == "n1"
        moved = requests.post(f"{base}/{sid}.json", data={"Module": "baton.echo"},
                              auth=REST_AUTH, timeout=15)
        assert moved.status_code == 200, moved.text
        cost = _wait(lambda: (c := requests.get(f"{base}/{sid}/Cost.json", auth=REST_AUTH,
                                                timeout=15)).status_code == 200 and c,
                     "the cost through node 2", timeout=30)
        assert cost.json()["call_sid"] == sid and cost.json()["live"] is True
        # The caller's credentials travel with the request: wrong ones stay wrong.
        bad = requests.get(f"{base}/{sid}.json", auth=(REST_SID, "wrong-token"), timeout=15)
        assert bad.status_code == 401
        with grpc.insecure_channel(g1) as ch:
            info = pb.sessions_pb2_grpc.SessionsStub(ch).Get(sp.GetRequest(session_id=sid),
                                                            metadata=AUTH)
            assert info.module == "baton.echo"            # the owner really moved the call
        peer.hang_up(call)
        _wait(lambda: r.get(f"{prefix}session:{sid}") is None, "the entry outlived the call")
        gone = requests.get(f"{base}/{sid}.json", auth=REST_AUTH, timeout=15)
        assert gone.status_code == 404 and gone.json()["code"] == 20404
    finally:
        peer.close()
        r.close()


def test_without_forwarding_the_answer_names_the_owner(prefix, tmp_path):
    with open(DEMO) as f:
        text = f.read()
    cfg = tmp_path / "noforward.toml"
    cfg.write_text(text + '\n[cluster]\nforward = false\n')
    n1, g1 = _node("127.0.0.11", "n1", prefix, str(cfg))
    n2, g2 = _node("127.0.0.12", "n2", prefix, str(cfg))
    peer = None
    try:
        _ready((n1, g1), (n2, g2))
        peer = BlockingPeer(n1)
        call = peer.answered_call("1000")
        r = _redis()
        key = _wait(lambda: next(iter(r.scan_iter(match=f"{prefix}session:*")), None),
                    "the directory entry")
        sid = key.rsplit(":", 1)[1]
        with grpc.insecure_channel(g2) as ch:
            with pytest.raises(grpc.RpcError) as err:
                pb.sessions_pb2_grpc.SessionsStub(ch).Cost(sp.CostRequest(session_id=sid),
                                                           metadata=AUTH)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
        assert "'n1'" in err.value.details() and g1 in err.value.details()
        peer.hang_up(call)
        r.close()
    finally:
        if peer is not None:
            peer.close()
        for n in (n1, n2):
            try:
                n.stop(20)
            finally:
                n.__exit__()


def test_a_lost_redis_loses_no_call_and_no_stamp(prefix):
    # Nothing listens on this port: every directory write fails.
    dead = f"redis://127.0.0.1:{free_port(socket.SOCK_STREAM)}/0"
    n1, g1 = _node("127.0.0.11", "n1", prefix, redis_url=dead)
    peer = None
    try:
        _ready((n1, g1))
        peer = BlockingPeer(n1)
        for _ in range(3):
            peer.hang_up(peer.answered_call("1000"))
        _wait(lambda: "Redis unavailable" in n1.output(), "no warning about Redis")
        assert n1.output().count("Redis unavailable") == 1     # once per outage
        with grpc.insecure_channel(g1) as ch:
            listed = pb.sessions_pb2_grpc.SessionsStub(ch).List(sp.ListRequest(), metadata=AUTH)
        assert listed.live == 0 and listed.started_total == 3
        # A session no node holds: the directory cannot be asked, and the answer says so.
        with grpc.insecure_channel(g1) as ch:
            with pytest.raises(grpc.RpcError) as err:
                pb.sessions_pb2_grpc.SessionsStub(ch).Transition(
                    sp.TransitionRequest(session_id="nope", target="baton.hold"), metadata=AUTH)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        if peer is not None:
            peer.close()
        try:
            assert n1.stop(20) == 0
        finally:
            n1.__exit__()


def test_entries_expire_without_their_node_and_come_back_with_redis(prefix):
    """In-process: a node's entries carry a TTL refreshed while live; what Redis lost
    while away is written again when it answers."""
    from engine.sessions.directory import SessionDirectory

    async def main():
        live = {"s1", "s2"}
        d = SessionDirectory(REDIS_URL, prefix, "n1", "127.0.0.11:1", lambda: list(live),
                             ttl=0.6)
        d.start()
        d.add("s1")
        d.add("s2")
        other = SessionDirectory(REDIS_URL, prefix, "n2", "127.0.0.12:1", lambda: [], ttl=0.6)
        try:
            for _ in range(100):
                if (await other.owner("s2")) is not None:
                    break
                await asyncio.sleep(0.02)
            assert (await other.owner("s1")).node == "n1"
            await asyncio.sleep(1.5)          # beyond the TTL: refreshed, still there
            assert set(await other.entries()) == {"s1", "s2"}
            await other.redis.delete(d.key("s2"))   # Redis lost an entry
            live.discard("s1")
            d.remove("s1")
            await asyncio.sleep(0.6)
            assert set(await other.entries()) == {"s2"}
            for t in d.tasks:                 # the node dies: nothing refreshes its entries
                t.cancel()
            await asyncio.sleep(0.8)
            assert await other.entries() == {}
        finally:
            await d.close()
            await other.close()

    asyncio.run(main())


def test_top_and_sessions_list_show_every_node(two_nodes, prefix):
    """`baton top --cluster` and `baton sessions list --cluster --token` find both nodes in
    the directory and ask each one's API: every call, with the node that holds it; a node
    that stops answering is named, the other's calls still shown."""
    (n1, g1), (n2, g2) = two_nodes
    r = _redis()
    p1, p2 = BlockingPeer(n1), BlockingPeer(n2)
    try:
        calls = [p1.answered_call("1000"), p2.answered_call("1001"), p2.answered_call("1000")]
        _wait(lambda: len(list(r.scan_iter(match=f"{prefix}session:*"))) == 3,
              "three directory entries")
        assert {json.loads(v)["node"] for v in
                r.mget(list(r.scan_iter(match=f"{prefix}node:*")))} == {"n1", "n2"}
        top = subprocess.run([BATON, "top", "--once", "--no-cost", "--cluster", REDIS_URL,
                              "--prefix", prefix, "--token", TOKEN],
                             capture_output=True, text=True, timeout=60)
        assert top.returncode == 0, top.stderr
        assert "calls: 3 live" in top.stdout and "nodes: 2   n1 1 live, n2 2 live" in top.stdout
        header = next(line for line in top.stdout.splitlines() if line.startswith("SESSION"))
        assert header.split()[:3] == ["SESSION", "NODE", "ACCOUNT"]
        rows = sorted([f[1], next(m for m in f if m.startswith("baton."))]
                      for f in (line.split() for line in top.stdout.splitlines()
                                if line.startswith("S") and not line.startswith("SESSION")))
        assert rows == [["n1", "baton.hold"], ["n2", "baton.echo"], ["n2", "baton.hold"]]
        listed = subprocess.run([BATON, "sessions", "list", "--cluster", REDIS_URL, "--prefix",
                                 prefix, "--token", TOKEN, "--format", "json"],
                                capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr
        got = json.loads(listed.stdout)
        assert sorted((c["node"], c["number"], c["module"]) for c in got) == [
            ("n1", "1000", "baton.hold"), ("n2", "1000", "baton.hold"),
            ("n2", "1001", "baton.echo")]
        assert all(c["account"] == "demo" for c in got)
        # Node 2 dies outright: its entries outlive it (TTL), its API does not answer.
        n2.proc.kill()
        n2.proc.wait()
        top = subprocess.run([BATON, "top", "--once", "--no-cost", "--cluster", REDIS_URL,
                              "--prefix", prefix, "--token", TOKEN],
                             capture_output=True, text=True, timeout=60)
        assert top.returncode == 0, top.stderr
        assert "nodes: 2   n1 1 live, n2 DOWN" in top.stdout
        assert f"node n2 ({g2}): cannot reach" in top.stdout
        assert "calls: 1 live" in top.stdout
        p1.hang_up(calls[0])
    finally:
        p1.close()
        p2.close()
        r.close()


def test_top_cluster_needs_a_token_and_a_redis_url():
    for args, words in ((["--cluster", REDIS_URL], "--cluster needs --token"),
                        (["--cluster", "127.0.0.1:6379", "--token", TOKEN], "not a Redis URL"),
                        (["--cluster", REDIS_URL, "--engine", "127.0.0.1:1", "--token", TOKEN],
                         "not both")):
        got = subprocess.run([BATON, "top", "--once", *args], capture_output=True, text=True,
                             timeout=60, env={k: v for k, v in os.environ.items()
                                              if k != "BATON_TOKEN"})
        assert got.returncode == 2 and words in got.stderr, got.stderr
