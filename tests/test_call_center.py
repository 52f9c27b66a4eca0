"""`baton.call_center` end to end: a real `baton serve`, agents that are PJSIP
endpoints registering with digest, PJSIP callers, statistics over gRPC and
the `baton queues` command.

The agents and callers live in one PJSIP child process
(tests/call_center_peer.py) driven by JSON lines: PJSIP allows one Endpoint
per process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from engine.config.load import ConfigError, from_dict
from tests.helpers import BATON, EngineProcess, ROOT, engine_config, free_port, period_now

grpc = pytest.importorskip("grpc")

PEER = os.path.join(ROOT, "tests", "call_center_peer.py")
TOKEN = "cc-test-token-0123456789abcdef"
OTHER_TOKEN = "cc-other-token-0123456789abcdef"
PASSWORDS = {"alice": "alice-pw-1", "bob": "bob-pw-2", "dave": "dave-pw-3"}


def config_text() -> str:
    base = 30000 + (os.getpid() * 131 % 20000)
    base -= base % 2
    users = "".join(f'[users.{u}]\npassword = "{p}"\n' for u, p in PASSWORDS.items())
    return f"""
[media]
address = "127.0.0.1"
rtp_port_min = {base}
rtp_port_max = {base + 400}

[registrar]
mode = "auth"
realm = "baton"

{users}
[call_center.agents.alice]
user = "alice"
[call_center.agents.bob]
user = "bob"
[call_center.agents.dave]
user = "dave"

[call_center.queues.sales]
account = "demo"
agents = ["alice", "bob"]
ring_timeout = 2
wrap_up = 2
announce_every = 5
greeting = "Thank you for calling sales."

[call_center.queues.line]
account = "demo"
agents = ["dave"]
max_size = 2
timeout = 6
announce_every = 2

[apps.sales]
start = "queue"
[apps.sales.nodes.queue]
module = "baton.call_center"
params = {{ queue = "sales" }}
outlets = {{ done = "survey", timeout = "sorry" }}
[apps.sales.nodes.survey]
module = "baton.play"
params = {{ text = "Thank you. Goodbye." }}
[apps.sales.nodes.sorry]
module = "baton.play"
params = {{ text = "Sorry. Goodbye." }}

[apps.line]
start = "queue"
[apps.line.nodes.queue]
module = "baton.call_center"
params = {{ queue = "line" }}
outlets = {{ timeout = "sorry", full = "busy" }}
[apps.line.nodes.sorry]
module = "baton.play"
params = {{ text = "Sorry, nobody could take your call. Goodbye." }}
[apps.line.nodes.busy]
module = "baton.play"
params = {{ text = "All lines are busy. Goodbye." }}

[plans.basic]
price = "0.001"
unit = "minute"
increment = "1/1"
[plans.service]
price = "0.02"
unit = "minute"
increment = "1/1"
[billing]
level_plans = {{ basic = "basic", application = "service", service = "service" }}

[accounts.demo]
api_tokens = ["{TOKEN}"]
[accounts.demo.numbers]
"5000" = {{ app = "sales" }}
"5001" = {{ app = "line" }}

[accounts.other]
api_tokens = ["{OTHER_TOKEN}"]
[accounts.other.numbers]
"6000" = "baton.hold"
"""


class Peer:
    """The PJSIP child process: commands in, events out."""

    def __init__(self, log: str):
        self.proc = subprocess.Popen([sys.executable, PEER, "--log", log],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.log = log
        self.events: list[dict] = []
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.wait(lambda e: e["ev"] == "ready", 15, "peer ready")

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            with self.lock:
                self.events.append(ev)

    def send(self, **cmd) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def find(self, pred) -> dict | None:
        with self.lock:
            for e in self.events:
                if pred(e):
                    return e
        return None

    def wait(self, pred, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            e = self.find(pred)
            if e is not None:
                return e
            errors = [e for e in self.events if e["ev"] == "error"]
            if errors or self.proc.poll() is not None or time.monotonic() > deadline:
                with open(self.log, errors="replace") as f:
                    tail = f.read()[-4000:]
                raise AssertionError(f"waiting for {what}: errors {errors}, "
                                     f"events {self.events[-20:]}\n{tail}")
            time.sleep(0.05)

    def state(self, cid: str, state: str, timeout: float = 10) -> dict:
        return self.wait(lambda e: e["ev"] == "state" and e["id"] == cid and e["state"] == state,
                         timeout, f"{cid} {state}")

    def stats(self, cid: str) -> dict:
        n = len([e for e in self.events if e["ev"] == "stats" and e["id"] == cid])
        self.send(op="stats", id=cid)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            found = [e for e in self.events if e["ev"] == "stats" and e["id"] == cid]
            if len(found) > n:
                return found[-1]
            time.sleep(0.05)
        raise AssertionError(f"no stats for {cid}")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send(op="quit")
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def center(tmp_path_factory):
    pytest.importorskip("pjsua2")
    d = tmp_path_factory.mktemp("cc")
    path = d / "cc.toml"
    path.write_text(config_text())
    engine = EngineProcess(str(path))
    engine.config = str(path)
    peer = None
    try:
        engine.wait_ready()
        peer = Peer(str(d / "pjsip.log"))
        channel = grpc.insecure_channel(f"127.0.0.1:{engine.grpc_port}")
        grpc.channel_ready_future(channel).result(timeout=10)
        yield engine, peer, channel
        channel.close()
    finally:
        if peer is not None:
            peer.close()
        code = engine.stop()
        out = engine.output()
        assert code == 0, out
        assert "Traceback" not in out, out


def stub(channel):
    from proto import pb

    return pb.call_center_pb2_grpc.CallCenterStub(channel)


def md(token=TOKEN):
    return (("authorization", f"Bearer {token}"),)


def stats(channel, name: str):
    from proto import pb

    r = stub(channel).QueueStats(pb.call_center_pb2.QueueStatsRequest(queue=name), metadata=md())
    return r.queues[0]


def agents(channel) -> dict:
    from proto import pb

    r = stub(channel).ListAgents(pb.call_center_pb2.ListAgentsRequest(), metadata=md())
    return {a.name: a for a in r.agents}


def until(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def queues_cli(engine, *args):
    return subprocess.run([BATON, "queues", "--engine", f"127.0.0.1:{engine.grpc_port}",
                           "--token", TOKEN, *args], capture_output=True, text=True, timeout=30)


@pytest.mark.interop
def test_positions_full_abandoned_timeout(center):
    engine, peer, channel = center
    uri = f"sip:5001@127.0.0.1:{engine.port}"
    # Nobody serves `line` (dave never registers): callers wait.
    assert agents(channel)["dave"].state == "offline"
    peer.send(op="call", id="l1", uri=uri)
    peer.state("l1", "CONFIRMED")
    peer.send(op="call", id="l2", uri=uri)
    peer.state("l2", "CONFIRMED")
    q = until(lambda: (lambda s: s if s.waiting == 2 and all(c.announcement for c in s.callers)
                       else None)(stats(channel, "line")), 15, "two announced callers")
    assert [c.position for c in q.callers] == [1, 2]
    assert "number 1 in the queue" in q.callers[0].announcement
    assert "number 2 in the queue" in q.callers[1].announcement
    assert "estimated wait" in q.callers[1].announcement
    assert q.longest_wait_seconds > 0 and q.agents.offline == 1
    # The queue holds two: a third caller is answered, told, and let go (`full`).
    peer.send(op="call", id="l3", uri=uri)
    peer.state("l3", "DISCONNECTED", 20)
    assert stats(channel, "line").rejected_full == 1
    # The first caller hangs up while waiting: abandoned.
    peer.send(op="hangup", id="l1")
    peer.state("l1", "DISCONNECTED")
    q = until(lambda: (lambda s: s if s.abandoned == 1 else None)(stats(channel, "line")), 10,
              "abandoned")
    assert q.waiting == 1 and q.callers[0].position == 1
    # The second hears hold music until the queue's timeout sends it to `sorry`.
    assert peer.stats("l2")["rx_packets"] > 0
    peer.state("l2", "DISCONNECTED", 30)
    q = until(lambda: (lambda s: s if s.timed_out == 1 else None)(stats(channel, "line")), 10,
              "timed out")
    assert (q.waiting, q.served, q.abandoned, q.rejected_full) == (0, 0, 1, 1)
    # The same numbers through the CLI.
    r = queues_cli(engine, "--queue", "line", "--format", "json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    line = out["queues"][0]
    # (uint64 fields come out of protobuf's JSON mapping as strings)
    assert (line["name"], int(line["abandoned"]), int(line["timed_out"]),
            int(line["rejected_full"]), int(line["served"])) == ("line", 1, 1, 1, 0)
    assert [a["name"] for a in out["agents"]] == ["dave"]
    r = queues_cli(engine)
    assert r.returncode == 0 and "line" in r.stdout and "sales" in r.stdout, r.stderr


@pytest.mark.interop
def test_api_errors(center):
    from proto import pb

    engine, peer, channel = center
    ccp = pb.call_center_pb2
    s = stub(channel)
    with pytest.raises(grpc.RpcError) as ei:
        s.QueueStats(ccp.QueueStatsRequest())
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as ei:
        s.QueueStats(ccp.QueueStatsRequest(queue="sales"), metadata=md(OTHER_TOKEN))
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND and "queue" in ei.value.details()
    assert not s.QueueStats(ccp.QueueStatsRequest(), metadata=md(OTHER_TOKEN)).queues
    with pytest.raises(grpc.RpcError) as ei:
        s.SetAgentState(ccp.SetAgentStateRequest(agent="dave", state="lunch"), metadata=md())
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ei.value.details().startswith("state:")
    with pytest.raises(grpc.RpcError) as ei:
        s.SetAgentState(ccp.SetAgentStateRequest(agent="nobody", state="offline"), metadata=md())
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as ei:
        s.SetAgentState(ccp.SetAgentStateRequest(agent="dave", state="offline"),
                        metadata=md(OTHER_TOKEN))
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    for rpc, req, field in ((s.QueueStats, ccp.QueueStatsRequest(queue="q" * 100_000), "queue:"),
                            (s.SetAgentState, ccp.SetAgentStateRequest(agent="a" * 100_000,
                                                                       state="offline"), "agent:")):
        with pytest.raises(grpc.RpcError) as ei:
            rpc(req, metadata=md())
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert ei.value.details().startswith(field)
    r = queues_cli(engine, "--queue", "nope")
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr


def history(engine, channel, sid: str) -> list:
    from proto import pb

    sp = pb.sessions_pb2
    h = pb.sessions_pb2_grpc.SessionsStub(channel).History(sp.HistoryRequest(session_id=sid),
                                                            metadata=md())
    return list(h.spans)


@pytest.mark.interop
def test_agents_longest_idle_no_answer_wrap_up_and_post_call(center):
    engine, peer, channel = center
    uri = f"sip:5000@127.0.0.1:{engine.port}"
    registrar = f"127.0.0.1:{engine.port}"
    # Alice signs in first, so she has been idle longest.
    peer.send(op="agent", name="alice", password=PASSWORDS["alice"], registrar=registrar)
    peer.wait(lambda e: e["ev"] == "registered" and e["name"] == "alice" and e["code"] == 200,
              10, "alice registered")
    until(lambda: agents(channel)["alice"].state == "available", 10, "alice available")
    time.sleep(0.2)
    peer.send(op="agent", name="bob", password=PASSWORDS["bob"], registrar=registrar)
    peer.wait(lambda e: e["ev"] == "registered" and e["name"] == "bob" and e["code"] == 200,
              10, "bob registered")
    until(lambda: agents(channel)["bob"].state == "available", 10, "bob available")
    # 1: alice (longest idle) answers; the session is handed down to baton.bridge.
    peer.send(op="call", id="s1", uri=uri)
    ev = peer.wait(lambda e: e["ev"] == "incoming", 10, "an agent rung")
    assert ev["agent"] == "alice"
    peer.state("alice-1", "CONFIRMED")
    a = until(lambda: (lambda a: a if a.state == "busy" and a.session_id else None)(
        agents(channel)["alice"]), 10, "alice busy")
    sid = a.session_id
    until(lambda: [s.module for s in history(engine, channel, sid)][-1:] == ["baton.bridge"],
          10, "bridged")
    time.sleep(1.0)
    assert peer.stats("alice-1")["rx_packets"] > 0   # the caller's audio reaches the agent
    # The agent hangs up: the caller goes to the post-call outlet, the agent to wrap-up.
    peer.send(op="hangup", id="alice-1")
    assert agents(channel)["alice"].state in ("wrap-up", "busy")
    until(lambda: agents(channel)["alice"].state == "wrap-up", 5, "alice in wrap-up")
    peer.state("s1", "DISCONNECTED", 20)
    spans = history(engine, channel, sid)
    assert [s.module for s in spans] == ["baton.call_center", "baton.bridge", "baton.play"]
    assert [s.level for s in spans] == ["service", "basic", "application"]
    assert spans[1].reason == "agent-answered" and spans[2].reason == "outlet:done"
    r = subprocess.run([BATON, "sessions", "history", sid, "--data-dir", engine.data_dir],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "agent-answered" in r.stdout, r.stderr
    until(lambda: agents(channel)["alice"].state == "available", 10, "alice available again")
    # 2: bob has now been idle longer than alice: he gets the next call.
    peer.send(op="call", id="s2", uri=uri)
    peer.wait(lambda e: e["ev"] == "incoming" and e["id"] == "bob-1", 10, "bob rung")
    peer.state("bob-1", "CONFIRMED")
    assert peer.find(lambda e: e["ev"] == "incoming" and e["id"] == "alice-2") is None
    peer.send(op="hangup", id="s2")      # the caller ends this one
    peer.state("bob-1", "DISCONNECTED")
    until(lambda: agents(channel)["bob"].state == "available", 10, "bob available again")
    # 3: alice (longest idle) lets it ring: after ring_timeout bob is rung and answers.
    peer.send(op="mode", name="alice", mode="ignore")
    peer.send(op="call", id="s3", uri=uri)
    peer.wait(lambda e: e["ev"] == "incoming" and e["id"] == "alice-2", 10, "alice rung")
    peer.wait(lambda e: e["ev"] == "incoming" and e["id"] == "bob-2", 15, "bob rung next")
    peer.state("alice-2", "DISCONNECTED")
    peer.state("bob-2", "CONFIRMED")
    q = stats(channel, "sales")
    assert q.served == 3 and q.abandoned == 0 and q.waiting == 0
    assert q.agents.busy == 1 and q.average_wait_seconds > 0
    peer.send(op="hangup", id="bob-2")
    peer.state("s3", "DISCONNECTED", 20)
    # Sign-out through the API, and an unregistered agent is offline.
    from proto import pb

    ccp = pb.call_center_pb2
    a = stub(channel).SetAgentState(ccp.SetAgentStateRequest(agent="alice", state="offline"),
                                    metadata=md())
    assert a.state == "offline" and a.signed_out
    a = stub(channel).SetAgentState(ccp.SetAgentStateRequest(agent="alice", state="available"),
                                    metadata=md())
    assert a.state == "available"
    peer.send(op="unregister", name="bob")
    until(lambda: agents(channel)["bob"].state == "offline", 15, "bob offline")
    q = stats(channel, "sales")
    assert (q.agents.available, q.agents.offline) == (1, 1) and q.average_handle_seconds > 0
    # One invoice: the wait in the queue at the service plan, the bridged talk at the basic one.
    assert engine.stop(timeout=20) == 0
    period = period_now()
    r = subprocess.run([BATON, "bill", "invoice", "--account", "demo", "--period", period,
                        "--format", "json", "--data-dir", engine.data_dir, "--config",
                        engine.config], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    plans = {(ln["module"], ln["plan"]) for ln in json.loads(r.stdout)["lines"]}
    assert {("baton.call_center", "service"), ("baton.bridge", "basic")} <= plans, r.stdout


# -- configuration errors (no engine needed) ---------------------------------------------
def _raw(**cc):
    raw = engine_config()
    raw["users"] = {"alice": {"password": "pw"}}
    raw["call_center"] = {"agents": {"alice": {"user": "alice"}},
                          "queues": {"q": {"agents": ["alice"]}}}
    for k, v in cc.items():
        raw["call_center"]["queues"]["q"][k] = v
    raw["apps"] = {"cc": {"start": "n", "nodes": {"n": {"module": "baton.call_center",
                                                        "params": {"queue": "q"}}}}}
    return raw


@pytest.mark.parametrize("change,key,problem", [
    (lambda r: r["call_center"]["queues"]["q"].update(ring_timeout=0),
     "call_center.queues.q.ring_timeout", "between 1 and 300"),
    (lambda r: r["call_center"]["queues"]["q"].update(agents=["zed"]),
     "call_center.queues.q.agents", "no agent 'zed'"),
    (lambda r: r["call_center"]["queues"]["q"].update(hold_music="/nonexistent.wav"),
     "call_center.queues.q.hold_music", "no such file"),
    (lambda r: r["call_center"]["queues"]["q"].update(max_size=2.5),
     "call_center.queues.q.max_size", "expected an integer"),
    (lambda r: r["call_center"]["queues"]["q"].update(colour="red"),
     "call_center.queues.q.colour", "unknown key"),
    (lambda r: r["call_center"]["queues"]["q"].update(position_prompt="You are {place}"),
     "call_center.queues.q.position_prompt", "{position}"),
    (lambda r: r["call_center"]["queues"]["q"].update(account="nobody"),
     "call_center.queues.q.account", "no account 'nobody'"),
    (lambda r: r["call_center"]["agents"].update(bob={"user": "bob"}),
     "call_center.agents.bob.user", "not one of [users]"),
    (lambda r: r["call_center"]["agents"].update(bob={"uri": "bob@example.com"}),
     "call_center.agents.bob.uri", "a SIP URI"),
    (lambda r: r["call_center"]["agents"].update(bob={"uri": "sip:b@h", "user": "alice"}),
     "call_center.agents.bob", "exactly one of"),
    (lambda r: r["call_center"].update(tables=1), "call_center.tables", "unknown key"),
    (lambda r: r["apps"]["cc"]["nodes"]["n"]["params"].update(queue="other"),
     "apps.cc.nodes.n.params.queue", "no queue 'other'"),
    (lambda r: r["apps"]["cc"]["nodes"]["n"].update(params={}),
     "apps.cc.nodes.n.params.queue", "required"),
    (lambda r: r["apps"]["cc"]["nodes"]["n"]["params"].update(timeout=-1),
     "apps.cc.nodes.n.params.timeout", "between"),
    (lambda r: r.update(registrar={"mode": "off"}), "call_center.agents.alice.user",
     "registrar is off"),
])
def test_config_errors(change, key, problem):
    raw = _raw()
    from_dict(raw, "cc.toml")          # the base config is fine
    change(raw)
    with pytest.raises(ConfigError) as ei:
        from_dict(raw, "cc.toml")
    assert ei.value.key == key and problem in ei.value.problem, str(ei.value)


def test_bad_config_stops_serve():
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write('[users.a]\npassword = "x"\n[call_center.agents.a]\nuser = "a"\n'
                '[call_center.queues.q]\nagents = ["a"]\nwrap_up = "long"\n'
                '[accounts.d.numbers]\n"1" = "baton.hold"\n')
    r = subprocess.run([BATON, "serve", "--config", f.name, "--sip-addr",
                        f"127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=30)
    os.unlink(f.name)
    assert r.returncode == 2
    assert "call_center.queues.q.wrap_up: expected a number" in r.stderr


# -- static URI agents, in process ---------------------------------------------------------
@pytest.mark.interop
async def test_static_agents_busy_then_answer_without_wrap_up():
    """Two `uri` agents: the first answers 486 (skipped, still available), the
    second answers and hangs up; with `wrap_up = 0` it is available at once, and
    a number routed straight to the module (no app) ends the call afterwards."""
    import asyncio

    from engine.modules.services.call_center import CallCenter
    from tests.helpers import running_engine
    from tests.test_bridge import far_end
    from tests.test_sessions import Caller

    t1, busy = await far_end(final=486, delay=0.05)
    t2, desk = await far_end(final=200, delay=0.05, hangup_after=0.5)
    raw = engine_config()
    raw["call_center"] = {
        "agents": {"busy": {"uri": f"sip:busy@127.0.0.1:{busy.port}"},
                   "desk": {"uri": f"sip:desk@127.0.0.1:{desk.port}"}},
        "queues": {"q": {"agents": ["busy", "desk"], "wrap_up": 0, "announce_position": False}}}
    raw["accounts"]["demo"]["numbers"]["7000"] = {"module": "baton.call_center", "queue": "q"}
    try:
        async with running_engine(raw) as eng:
            caller = Caller(eng, "7000")
            await caller.dial()
            bye = None
            while bye is None:
                m = await caller.c.recv(timeout=10)
                if m.is_request and m.method == "BYE":
                    bye = m
            center = CallCenter.of(eng)
            await asyncio.sleep(0.1)
            assert [i.get("x-baton-queue") for i in busy.invites + desk.invites] == ["q", "q"]
            assert "tester@" in desk.invites[0].get("from")      # the caller's identity
            a = {n: center.agent_info(x) for n, x in center.agents.items()}
            assert (a["busy"]["state"], a["busy"]["calls"]) == ("available", 0)
            assert (a["desk"]["state"], a["desk"]["calls"]) == ("available", 1)
            st = center.queue_stats("q")
            assert (st["served"], st["waiting"], st["abandoned"]) == (1, 0, 0)
            assert eng.sessions == {}
            s = eng.finished[-1]
            assert [h.module for h in s.history] == ["baton.call_center", "baton.bridge"]
            caller.close()
    finally:
        t1.close()
        t2.close()


def test_an_agent_who_does_not_answer_leaves_no_leg_on_the_session():
    import types

    from engine.modules.services.call_center import AgentLeg, CallCenter, Offer

    released = []
    media = types.SimpleNamespace(drop_channel=lambda ch: None, release=released.append)
    session = types.SimpleNamespace(legs=["caller"], engine=types.SimpleNamespace(media=media))
    center = CallCenter.__new__(CallCenter)
    waiting = types.SimpleNamespace(offer=None)
    for _ in range(100):            # a caller who waits long rings many agents
        offer = Offer(center, waiting, agent=None)
        offer.leg = AgentLeg(session)
        waiting.offer = offer
        center._close_offer(offer, cancel=False)
        assert offer.leg.ended and waiting.offer is None
    assert session.legs == ["caller"]
