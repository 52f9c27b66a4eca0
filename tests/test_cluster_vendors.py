"""Vendors across a cluster (issue 19, docs/cluster.md): a vendor process attached to one
node with the SDK's `discover` learns every node from the session directory in Redis,
attaches to each (one that joins later too), takes the calls of every node, and when it
is killed the sessions it held on every node follow their fallback outlet."""
from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest

from proto import pb
from tests.helpers import DEMO, ROOT, BlockingPeer, EngineProcess, free_port
from tests.test_cluster_directory import (AUTH, REDIS_URL, _ready, _wait,  # noqa: F401
                                          prefix)

pytestmark = pytest.mark.kernels_only

SECRET = "acme-demo-secret-change-me"      # examples/demo.toml [vendors.acme]
sp = pb.sessions_pb2


def _node(host: str, node: str, prefix: str, config: str) -> tuple[EngineProcess, str]:
    """A node on its own loopback address sharing the test's Redis (no accountant: these
    tests bill nothing)."""
    grpc_addr = f"{host}:{free_port(socket.SOCK_STREAM, host=host)}"
    e = EngineProcess(config, host=host, extra=[
        "--grpc-addr", grpc_addr, "--node-id", node, "--media-addr", host,
        "--redis", REDIS_URL, "--cluster-prefix", prefix, "--no-accountant"])
    return e, grpc_addr


class Vendor:
    """tests/vendor_procs/basic.py as a child process; its lines read in a thread."""

    def __init__(self, target: str):
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tests", "vendor_procs", "basic.py"),
             "--engine", target, "--code", "acme.survey", "--secret", SECRET,
             "--mode", "hold", "--discover"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def expect(self, head: str, timeout: float = 15.0) -> str:
        """The next line starting with `head` (earlier lines are kept in `seen`)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0 and self.proc.poll() is None or not self.lines.empty(), \
                f"no {head!r} line from the vendor:\n" + "\n".join(self.seen)
            try:
                line = self.lines.get(timeout=max(0.05, min(left, 0.5)))
            except queue.Empty:
                continue
            self.seen.append(line)
            if line.startswith(head):
                return line

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _spans(grpc_addr: str, sid: str) -> list[tuple[str, str]]:
    with grpc.insecure_channel(grpc_addr) as ch:
        h = pb.sessions_pb2_grpc.SessionsStub(ch).History(sp.HistoryRequest(session_id=sid),
                                                         metadata=AUTH)
    return [(s.module, s.reason) for s in h.spans]


def test_a_vendor_attached_once_serves_every_node_and_falls_back_on_every_node(prefix,
                                                                                tmp_path):
    with open(DEMO) as f:
        text = f.read()
    cfg = tmp_path / "nodes.toml"
    # A short TTL: the node list is read every third of it, so a node that joins is
    # told to the vendors attached elsewhere within 0.5 s.
    cfg.write_text(text + "\n[cluster]\ndirectory_ttl = 1.5\n")
    n1, g1 = _node("127.0.0.11", "n1", prefix, str(cfg))
    n2, g2 = _node("127.0.0.12", "n2", prefix, str(cfg))
    vendor = None
    peers = []
    try:
        _ready((n1, g1), (n2, g2))
        # Attached to node 1 only: node 1 lists node 2 (in Registered, or in ClusterNodes
        # once node 2 has listed itself), and the vendor attaches there too.
        vendor = Vendor(g1)
        vendor.expect("READY")
        while (line := vendor.expect("NODES")) != "NODES n1,n2":
            assert line == "NODES n1", line
        _wait(lambda: "vendor acme attached" in n2.output(), "the vendor never reached n2")

        # One call to number 3000 (acme.survey, fallback "sorry") on each node.
        owners = {}
        for engine, addr in ((n1, g1), (n2, g2)):
            peer = BlockingPeer(engine)
            peers.append(peer)
            peer.answered_call("3000")         # the vendor answered it
            sid = vendor.expect("TAKEN").split()[1]
            owners[sid] = addr
        for sid, addr in owners.items():
            with grpc.insecure_channel(addr) as ch:
                info = pb.sessions_pb2_grpc.SessionsStub(ch).Get(sp.GetRequest(session_id=sid),
                                                                metadata=AUTH)
            assert info.live and info.module == "acme.survey", (addr, info)

        # The vendor dies: each node sees its own stream go and sends its session to
        # the fallback outlet.
        vendor.kill()
        for sid, addr in owners.items():
            spans = _wait(lambda: s if len(s := _spans(addr, sid)) >= 2 else None,
                          f"session {sid} on {addr} did not fall back")
            assert spans[:2] == [("acme.survey", "initial"),
                                 ("baton.play", "fallback:stream-lost")], (addr, spans)
        for engine in (n1, n2):
            assert "Traceback" not in engine.output(), engine.output()
    finally:
        if vendor is not None:
            vendor.kill()
        for peer in peers:
            peer.close()
        for n in (n1, n2):
            try:
                n.stop(20)
            finally:
                n.__exit__()


async def test_a_lone_node_lists_no_cluster_and_discover_changes_nothing():
    """Without [cluster] redis, Registered lists no nodes: the client stays on its one."""
    from control.sdk import VendorClient
    from tests.helpers import running_engine
    from tests.vendor_procs.harness import SECRET_A, control_config, target

    async with running_engine(control_config()) as eng:
        v = VendorClient(target(eng), "acme.survey", SECRET_A, discover=True)
        await v.start()
        try:
            assert v.node_id == eng.cfg.node_id
            assert v.nodes == {v.node_id: target(eng)} and v.peers == {}
        finally:
            await v.close()


async def test_the_sdk_lets_a_node_go_when_it_leaves_and_follows_it_back_elsewhere(prefix):
    """In-process nodes sharing Redis: node b stops (its entry goes, the vendor's stream
    to it is let go), then comes back on another port: the vendor attaches there and
    b's calls reach the vendor's one handler again."""
    from control.sdk import VendorClient
    from tests.helpers import running_engine
    from tests.test_sessions import Caller
    from tests.vendor_procs.harness import SECRET_A, control_config, target, wait_until

    def config(node: str, rtp_base: int) -> dict:
        raw = control_config(node_id=node)
        raw["media"].update(rtp_port_min=rtp_base, rtp_port_max=rtp_base + 200)
        raw["cluster"] = {"redis": REDIS_URL, "prefix": prefix, "directory_ttl": 1.5}
        return raw

    base = 30000 + (os.getpid() * 97 % 20000) // 2 * 2
    taken: list[tuple[str, str]] = []
    async with running_engine(config("a", base)) as a:
        v = VendorClient(target(a), "acme.survey", SECRET_A, discover=True,
                         backoff_initial=0.05, backoff_max=0.2)

        @v.on_offer
        async def on(offer):
            call = await offer.take()
            taken.append((offer.session_id, call.client.node_id))
            await call.answer()

        await v.start()
        try:
            assert v.nodes == {"a": target(a)}
            async with running_engine(config("b", base + 400)) as b:
                assert await wait_until(lambda: v.nodes.get("b") == target(b), 5), v.nodes
                first = v.peers["b"]
            # b stopped: it left the list, and the vendor let its stream go.
            assert await wait_until(lambda: "b" not in v.peers, 5), v.peers
            assert first.registered.is_set() is False and v.nodes == {"a": target(a)}
            async with running_engine(config("b", base + 800)) as b2:
                assert target(b2) != first.target
                assert await wait_until(lambda: v.nodes.get("b") == target(b2), 5), v.nodes
                caller = Caller(b2, "4000")
                await caller.dial()
                assert await wait_until(lambda: taken, 5)
                assert taken[0][1] == "b" and taken[0][0] in b2.sessions
                await caller.bye()
                caller.close()
        finally:
            await v.close()
        assert v.peers == {} and not v.registered.is_set()


async def test_with_redis_unreachable_a_vendor_still_attaches():
    """The node list is routing only: a node whose Redis does not answer still registers
    a vendor, listing what it last knew (here nothing: the vendor stays on this node)."""
    from control.sdk import VendorClient
    from tests.helpers import running_engine
    from tests.vendor_procs.harness import SECRET_A, control_config, target

    raw = control_config(node_id="a")
    raw["cluster"] = {"redis": f"redis://127.0.0.1:{free_port(socket.SOCK_STREAM)}/0"}
    async with running_engine(raw) as a:
        v = VendorClient(target(a), "acme.survey", SECRET_A, discover=True)
        await v.start(timeout=10)
        try:
            assert v.nodes == {"a": target(a)} and v.peers == {}
        finally:
            await v.close()
