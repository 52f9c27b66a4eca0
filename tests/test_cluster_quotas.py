"""API-key quotas across a cluster (issue 19, docs/cluster.md): two real `baton serve`
nodes on 127.0.0.11 and .12 share one Redis; a key's calls are counted there atomically,
so its quota (and its top-ups) hold for the cluster in total, not per node, over gRPC and
REST alike; with Redis unreachable a key's calls are refused, never served uncounted."""
from __future__ import annotations

import asyncio
import socket

import grpc
import pytest

from proto import pb
from tests.helpers import DEMO, BlockingPeer, free_port
from tests.test_cluster_directory import (REDIS_URL, REST_SID, _node,  # noqa: F401
                                          _ready, _redis, _wait, prefix)

pytestmark = pytest.mark.kernels_only

sp = pb.sessions_pb2
KEY = "partner-key-token-0123456789"
TOPPED = "topped-key-token-0123456789"
FWD = "forward-key-token-0123456789"
QUOTA = 7
KEYS = f"""
[api_keys.partner]
account = "demo"
token = "{KEY}"
quota = {QUOTA}
period = "day"

[api_keys.topped]
account = "demo"
token = "{TOPPED}"
quota = 2
period = "day"
auto_top_up = {{ calls = 2, price = "5.00" }}

[api_keys.fwd]
account = "demo"
token = "{FWD}"
quota = 100
period = "day"
"""


@pytest.fixture
def config(tmp_path):
    with open(DEMO) as f:
        text = f.read()
    path = tmp_path / "keys.toml"
    path.write_text(text + KEYS)
    return str(path)


def _stop(*nodes) -> None:
    for n in nodes:
        try:
            n.stop(20)
        finally:
            n.__exit__()


async def _list_calls(targets: list[str], token: str, n: int) -> list[grpc.StatusCode]:
    """n List calls at once, spread over the nodes in turn; the status of each."""
    chans = [grpc.aio.insecure_channel(t) for t in targets]
    stubs = [pb.sessions_pb2_grpc.SessionsStub(c) for c in chans]

    async def one(i: int) -> grpc.StatusCode:
        try:
            await stubs[i % len(stubs)].List(sp.ListRequest(),
                                             metadata=(("authorization", f"Bearer {token}"),))
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            one.details[exc.code()] = exc.details()
            return exc.code()

    one.details = {}
    try:
        got = list(await asyncio.gather(*(one(i) for i in range(n))))
    finally:
        for c in chans:
            await c.close()
    _list_calls.details = one.details
    return got


def test_an_api_key_quota_holds_across_two_nodes(prefix, config):
    import requests

    n1, g1 = _node("127.0.0.11", "n1", prefix, config)
    n2, g2 = _node("127.0.0.12", "n2", prefix, config)
    r = _redis()
    try:
        _ready((n1, g1), (n2, g2))
        # 16 calls at once, half to each node: the quota of 7 holds in total, not per node
        # (each node alone would admit 7, 14 in all).
        got = asyncio.run(_list_calls([g1, g2], KEY, 16))
        assert got.count(grpc.StatusCode.OK) == QUOTA
        assert got.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 16 - QUOTA
        refusal = _list_calls.details[grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert "'partner'" in refusal and f"quota of {QUOTA} calls" in refusal
        assert "across the cluster" in refusal
        [key] = r.keys(f"{prefix}apikey:partner:*")
        assert r.hget(key, "calls") == str(QUOTA) and 0 < r.ttl(key) <= 2 * 86400
        # REST counts in the same place: the key's REST call on either node is refused too.
        for node in (n1, n2):
            rest = requests.get(f"http://{node.rest}/2010-04-01/Accounts/{REST_SID}/Calls.json",
                                auth=("partner", KEY), timeout=15)
            assert rest.status_code == 429 and rest.json()["code"] == 20429, rest.text
        # Top-ups are taken across the cluster too: 2 included, then blocks of 2; 6 calls
        # over both nodes take exactly 2 top-ups, each by one node.
        got = asyncio.run(_list_calls([g1, g2], TOPPED, 6))
        assert got == [grpc.StatusCode.OK] * 6
        [key] = r.keys(f"{prefix}apikey:topped:*")
        assert r.hgetall(key) == {"calls": "6", "top_ups": "2"}
        logs = n1.output() + n2.output()
        assert logs.count("topped up 2 calls") == 2
        assert "top-up 1 of" in logs and "top-up 2 of" in logs
        # A request about a call on node 1 sent to node 2 is forwarded, and counted once:
        # node 2 counts it and hands node 1 a one-time ticket instead of a second count.
        peer = BlockingPeer(n1)
        try:
            call = peer.answered_call("1000")
            sid = _wait(lambda: next(iter(r.scan_iter(match=f"{prefix}session:*")), None),
                        "the directory entry").rsplit(":", 1)[1]
            with grpc.insecure_channel(g2) as ch:
                stub = pb.sessions_pb2_grpc.SessionsStub(ch)
                for _ in range(2):
                    info = stub.Get(sp.GetRequest(session_id=sid),
                                    metadata=(("authorization", f"Bearer {FWD}"),))
                    assert info.live
                # A ticket the caller makes up counts nothing off: the call is counted.
                stub.List(sp.ListRequest(), metadata=(("authorization", f"Bearer {FWD}"),
                                                      ("baton-counted", "0" * 32)))
            url = f"http://{n2.rest}/2010-04-01/Accounts/{REST_SID}/Calls/{sid}.json"
            for _ in range(2):
                got = requests.get(url, auth=("fwd", FWD), timeout=15)
                assert got.status_code == 200 and got.headers["baton-forwarded"] == "n1"
            [key] = r.keys(f"{prefix}apikey:fwd:*")
            assert r.hget(key, "calls") == "5"            # 2 + 1 + 2, none twice
            assert list(r.scan_iter(match=f"{prefix}counted:*")) == []   # each ticket used
            peer.hang_up(call)
        finally:
            peer.close()
    finally:
        r.close()
        _stop(n1, n2)


def test_with_redis_lost_an_api_key_is_refused_not_uncounted(prefix, config):
    import requests

    dead = f"redis://127.0.0.1:{free_port(socket.SOCK_STREAM)}/0"   # nothing listens
    n1, g1 = _node("127.0.0.11", "n1", prefix, config, redis_url=dead)
    try:
        _ready((n1, g1))
        got = asyncio.run(_list_calls([g1], KEY, 3))
        assert got == [grpc.StatusCode.UNAVAILABLE] * 3
        assert "cannot be recorded" in _list_calls.details[grpc.StatusCode.UNAVAILABLE]
        rest = requests.get(f"http://{n1.rest}/2010-04-01/Accounts/{REST_SID}/Calls.json",
                            auth=("partner", KEY), timeout=15)
        assert rest.status_code == 503 and rest.json()["code"] == 20503, rest.text
        # The account's own token is not metered: it still works.
        got = asyncio.run(_list_calls([g1], "demo-api-token-change-me-0123456789", 2))
        assert got == [grpc.StatusCode.OK] * 2
        assert n1.output().count("API-key quotas: Redis unavailable") == 1   # once per outage
    finally:
        _stop(n1)
