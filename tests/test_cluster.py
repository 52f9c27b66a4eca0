"""A Baton cluster behind Kamailio's dispatcher (issue 19): `baton cluster up`
with the real Kamailio, PostgreSQL and SIPp; calls land on every node, a
drained node fails no call, a killed node's share of failed calls is bounded,
its calls in flight are billed to their last stamp once it is back, and the
consolidated invoices equal a recount of every node's stamps."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import time
import uuid

import pytest

from tests.helpers import BATON, free_port
from tests.test_accounting_crash import CONFIG
from tests.test_accounting_ledger import PG_URL, _drop_schema, _pg_unreachable
from tests.test_cluster_ledger import _expected

SIPP = shutil.which("sipp")
SCENARIO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sipp", "cluster_uac.xml")
KAMAILIO = shutil.which("kamailio") or ("/usr/sbin/kamailio" if os.path.exists("/usr/sbin/kamailio")
                                        else None)
# The nodes' config: number 1000 holds the call (basic level), priced by the plans the
# recount (tests/test_accounting_crash.py `expected_ledger`) knows.
NODE_CONFIG = """
[accounts.demo]
currency = "USD"
sid = "AC0000000000000000000000000000demo"
auth_token = "demo-auth-token-change-me-0123456789"

[accounts.demo.numbers]
"1000" = { module = "baton.hold" }
""" + CONFIG.split("[vendors.acme]")[0].format(pipeline="false")
# The recount prices a module by its name; these nodes' modules are priced by level.
RECOUNT_MODULE = {"basic": "baton.bridge", "application": "baton.menu"}
pytestmark = [pytest.mark.interop,
              pytest.mark.skipif(not (SIPP and KAMAILIO), reason="needs sipp and kamailio")]


def _bindable(host: str, port: int) -> bool:
    import socket

    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


@pytest.fixture
def cluster(tmp_path):
    reason = _pg_unreachable()
    if reason:
        pytest.skip(reason)
    schema = f"baton_cl_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    nodes = ("127.0.0.11", "127.0.0.12")
    while True:
        front, sip, grpc, http = (free_port(host="127.0.0.10"), free_port(host=nodes[0]),
                                  free_port(host=nodes[0]), free_port(host=nodes[0]))
        if all(_bindable(h, p) for h in nodes for p in (sip, grpc, http)) and \
                len({sip, grpc, http}) == 3:
            break
    base = tmp_path / "cluster"
    config = tmp_path / "nodes.toml"
    config.write_text(NODE_CONFIG)
    out = open(tmp_path / "cluster-up.txt", "wb")
    proc = subprocess.Popen([BATON, "cluster", "up", "--nodes", "2", "--port", str(front),
                             "--config", str(config),
                             "--node-port", str(sip), "--grpc-port", str(grpc),
                             "--http-port", str(http), "--dir", str(base),
                             "--store", f"{PG_URL}?schema={schema}", "--ping-interval", "1",
                             "--prefix", f"baton-test:{schema}:"],
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (base / "cluster.json").exists():
            assert proc.poll() is None, (tmp_path / "cluster-up.txt").read_text()
            assert time.monotonic() < deadline, "the cluster did not start"
            time.sleep(0.2)
        info = json.loads((base / "cluster.json").read_text())
        info["proc"] = proc
        info["port"] = front
        info["schema"] = schema
        info["store"] = f"{PG_URL}?schema={schema}"
        info["output"] = tmp_path / "cluster-up.txt"
        time.sleep(1.5)                      # a first round of OPTIONS probes
        yield info
    finally:
        _stop_cluster(proc)
        out.close()
        _drop_schema(schema)


def _stop_cluster(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            pass
    # Whatever happened: nothing of this cluster outlives the test.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _sipp(tmp_path, name: str, port: int, *args: str) -> subprocess.Popen:
    stat = tmp_path / f"{name}.csv"
    cmd = [SIPP, "-sf", SCENARIO, f"127.0.0.10:{port}", "-s", "1000", "-i", "127.0.0.1",
           "-p", str(free_port()), "-mi", "127.0.0.1", "-mp", str(free_port(even=True)),
           "-recv_timeout", "8000", "-timeout", "60s", "-nostdin", "-trace_stat",
           "-stf", str(stat), "-fd", "1", "-trace_err", *args]
    return subprocess.Popen(cmd, cwd=tmp_path, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _counts(tmp_path, name: str) -> tuple[int, int]:
    """(successful, failed) calls from SIPp's last statistics line."""
    with open(tmp_path / f"{name}.csv") as f:
        rows = list(csv.reader(f, delimiter=";"))
    head, last = rows[0], rows[-1]
    return int(last[head.index("SuccessfulCall(C)")]), int(last[head.index("FailedCall(C)")])


def _sessions(node: dict) -> list[dict]:
    out = subprocess.run([BATON, "sessions", "list", "--data-dir", node["data_dir"], "--format",
                          "json", "--limit", "1000"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def _finish(p: subprocess.Popen, timeout: float = 90) -> None:
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise


def test_calls_land_on_every_node_and_a_drained_node_fails_none(cluster, tmp_path):
    n1, n2 = cluster["nodes"]
    sipp = _sipp(tmp_path, "spread", cluster["port"], "-m", "8", "-r", "8", "-d", "300")
    _finish(sipp)
    ok, failed = _counts(tmp_path, "spread")
    assert (ok, failed) == (8, 0)
    time.sleep(0.5)                         # the journal thread's last batch
    assert len(_sessions(n1)) == 4 and len(_sessions(n2)) == 4    # round-robin
    # Drain node1 while calls run through the front door: none fails.
    sipp = _sipp(tmp_path, "drain", cluster["port"], "-m", "15", "-r", "5", "-d", "2000")
    time.sleep(1.0)
    drain = subprocess.run([BATON, "node", "drain", "--data-dir", n1["data_dir"],
                            "--timeout", "60"], capture_output=True, text=True, timeout=90)
    assert drain.returncode == 0, drain.stderr
    _finish(sipp)
    ok, failed = _counts(tmp_path, "drain")
    assert (ok, failed) == (15, 0)
    drained = [s for s in _sessions(n1) if s["live"]]
    assert drained == []                     # every call node1 had ended by itself


def test_a_killed_node_fails_a_bounded_share_and_is_billed_in_full(cluster, tmp_path):
    n1, n2 = cluster["nodes"]
    base = tmp_path / "cluster"
    # Two long calls, one on each node (round-robin): node1's is in flight when it dies.
    long = _sipp(tmp_path, "long", cluster["port"], "-m", "2", "-r", "2", "-d", "6000")
    time.sleep(1.0)
    sipp = _sipp(tmp_path, "kill", cluster["port"], "-m", "30", "-r", "5", "-d", "500")
    time.sleep(2.0)
    os.kill(n1["pid"], signal.SIGKILL)
    _finish(sipp)
    ok, failed = _counts(tmp_path, "kill")
    share = failed / 30
    print(f"calls failed around the kill: {failed}/30 = {share:.0%}")
    assert ok + failed == 30 and share < 0.5
    # After the probe interval, every new call succeeds on the node left.
    sipp = _sipp(tmp_path, "after", cluster["port"], "-m", "6", "-r", "6", "-d", "200")
    _finish(sipp)
    assert _counts(tmp_path, "after") == (6, 0)
    _finish(long)
    assert _counts(tmp_path, "long") == (1, 1)          # node2's ended, node1's died with it
    # node1 comes back (`baton cluster up` restarts it); then the whole cluster stops, each
    # accountant draining its ring into the one ledger.
    _restarted(n1, base, n1["pid"])
    _stop_cluster(cluster["proc"])
    in_flight = set()
    want: dict[str, tuple[int, int]] = {}
    for node in cluster["nodes"]:
        stamps, stale = _recount_stamps(os.path.join(node["data_dir"], "ring", "ring.dat"))
        want.update(_expected(node["id"], stamps))
        in_flight |= {f"{node['id']}:stale:{sid}" for sid in stale}
    from engine.accounting.invoices import invoice
    from engine.accounting.ledger_pg import PostgresLedger

    with PostgresLedger(cluster["store"]) as led:
        txns = led.transactions()
        assert led.check() == []
        invoiced = sum(invoice(led, a, p)["total_micro"]
                       for a in {t["account"] for t in txns} for p in {t["period"] for t in txns})
    # node1's calls in flight at the kill: billed to their last stamp once it restarted.
    assert in_flight and {k for k in in_flight if k.startswith("node1:")} == in_flight
    assert in_flight <= {t["key"] for t in txns}
    print(f"{len(txns)} ledger lines, {len(in_flight)} closed at node1's last stamp, "
          f"invoiced {invoiced} micro-units")
    # The consolidated invoices equal the recount of every node's stamps, to the micro-unit.
    assert sorted(t["amount"] for t in txns) == sorted(v[0] for v in want.values())
    assert invoiced == sum(v[0] for v in want.values())


def _recount_stamps(ring_path: str) -> tuple[list[tuple], set[str]]:
    """A node's ring as the recount's stamps (tests/test_accounting_crash.py `generate`),
    and the sessions it had in flight when its engine died. A restart ends those at the
    last moment the node's stamps prove it alive, as the accountant must."""
    import msgpack

    from ext.kernels import ring

    stamps: list[tuple] = []
    live: dict[str, str] = {}                # session -> account, in control of a module
    stale: set[str] = set()
    last = 0
    for _seq, payload in ring.retained(ring_path):
        rec = msgpack.unpackb(payload)
        kind, sid = rec["type"], rec.get("session", "")
        if kind == "node":
            stale |= set(live)
            stamps += [("end", s, acc, last) for s, acc in live.items()]
            live.clear()
            continue
        assert kind in ("session", "transition"), rec       # no counted actions here
        last = max(last, rec["mono_ns"])
        if kind == "transition":
            stamps.append(("go", sid, rec["account"], rec["from"],
                           RECOUNT_MODULE[rec["level"]], rec["level"], rec["mono_ns"]))
            live[sid] = rec["account"]
        else:
            stamps.append((rec["kind"], sid, rec["account"], rec["mono_ns"]))
            if rec["kind"] == "end":
                live.pop(sid, None)
    assert not live, f"sessions never ended: {sorted(live)}"
    return stamps, stale


def _restarted(node: dict, base, old_pid: int, timeout: float = 60) -> dict:
    """The node's entry in cluster.json once `baton cluster up` started it again and it
    answers OPTIONS."""
    from engine.cli.cluster import _options_ok

    deadline = time.monotonic() + timeout
    while True:
        info = json.loads((base / "cluster.json").read_text())
        now = next(n for n in info["nodes"] if n["id"] == node["id"])
        if now["pid"] != old_pid and _options_ok(now["address"], now["sip_port"]):
            return now
        assert time.monotonic() < deadline, f"{node['id']} did not come back"
        time.sleep(0.2)


def test_a_rolling_restart_fails_no_call(cluster, tmp_path):
    base = tmp_path / "cluster"
    sipp = _sipp(tmp_path, "rolling", cluster["port"], "-m", "60", "-r", "4", "-d", "1000")
    time.sleep(1.0)
    for node in cluster["nodes"]:
        drain = subprocess.run([BATON, "node", "drain", "--data-dir", node["data_dir"],
                                "--timeout", "30"], capture_output=True, text=True, timeout=60)
        assert drain.returncode == 0, drain.stderr
        _restarted(node, base, node["pid"])
        time.sleep(1.5)                   # a probe marks it active again in the dispatcher
    _finish(sipp)
    assert _counts(tmp_path, "rolling") == (60, 0)


def test_rest_on_any_node_of_cluster_up_reaches_the_owner(cluster, tmp_path):
    """`baton cluster up` gives every node its REST API on its own address (printed and in
    cluster.json); a REST request about a call sent to the node that does not hold it is
    forwarded to the owner."""
    import redis
    import requests

    sid_ac, token = "AC0000000000000000000000000000demo", "demo-auth-token-change-me-0123456789"
    nodes = {n["id"]: n for n in cluster["nodes"]}
    printed = cluster["output"].read_text()
    for n in nodes.values():
        assert n["http"].startswith(n["address"] + ":")
        assert f"http://{n['http']}" in printed
    call = _sipp(tmp_path, "rest", cluster["port"], "-m", "1", "-d", "6000")
    r = redis.Redis.from_url("redis://127.0.0.1:6379/0", decode_responses=True)
    try:
        deadline = time.monotonic() + 15
        while not (keys := list(r.scan_iter(match=f"{cluster['prefix']}session:*"))):
            assert time.monotonic() < deadline, "the call never reached the directory"
            time.sleep(0.1)
        sid = keys[0].rsplit(":", 1)[1]
        owner = json.loads(r.get(keys[0]))
        assert owner["http"] == nodes[owner["node"]]["http"]
        other = next(n for n in nodes.values() if n["id"] != owner["node"])
        base = f"http://{other['http']}/2010-04-01/Accounts/{sid_ac}/Calls/{sid}"
        got = requests.get(f"{base}.json", auth=(sid_ac, token), timeout=15)
        assert got.status_code == 200, got.text
        assert got.json()["status"] == "in-progress"
        assert got.headers["baton-forwarded"] == owner["node"]
        history = requests.get(f"{base}/History.json", auth=(sid_ac, token), timeout=15)
        assert history.status_code == 200, history.text
        assert history.headers["baton-forwarded"] == owner["node"]
        bad = requests.get(f"{base}.json", auth=(sid_ac, "not-the-token-0123456789"), timeout=15)
        assert bad.status_code == 401 and "code" in bad.json()
        # Hung up through the wrong node: the owner ends the call, the caller sees a BYE.
        hung = requests.post(f"{base}.json", data={"Status": "completed"}, auth=(sid_ac, token),
                             timeout=15)
        assert hung.status_code == 200, hung.text
        deadline = time.monotonic() + 5          # well before the caller's own BYE at 6 s
        while r.get(keys[0]) is not None:
            assert time.monotonic() < deadline, "the call outlived its hang-up"
            time.sleep(0.05)
        _finish(call, 30)
    finally:
        r.close()
