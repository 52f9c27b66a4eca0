#!/usr/bin/env python3
"""Cluster benchmark: calls per second and CPU per call through Kamailio's dispatcher to
1, 2 and 3 Baton nodes (`baton cluster up`), against the same single node called directly
without Kamailio, in the same run.

For each cluster size SIPp (tests/sipp/cluster_uac.xml: INVITE, 200, ACK, BYE, 200 through
the Record-Route) offers --rate calls/s for --seconds to Kamailio on 127.0.0.10; the CPU
time of every node's process tree (engine and accountant), of Kamailio's processes, the
rows the cluster wrote to PostgreSQL (its schema's inserts, updates and deletes) and the
commands Redis processed (the whole server: other users of it count too) are divided by
the completed calls. With one node, the same SIPp load is first sent to the node directly.

Prints one JSON line on stdout: every step, and per cluster size N the figures cps_N,
nodes_cpu_us_per_call_N, kamailio_cpu_us_per_call_N (for 3 nodes: cps_3,
nodes_cpu_us_per_call_3, kamailio_cpu_us_per_call_3), beside direct_cps and
direct_cpu_us_per_call of the node called without Kamailio.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import BenchError  # noqa: E402

SCENARIO = common.REPO_DIR / "tests" / "sipp" / "cluster_uac.xml"
PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


def pg_rows(schema: str) -> int:
    import psycopg

    with psycopg.connect(PG_URL, autocommit=True) as conn:
        return int(conn.execute(
            "SELECT COALESCE(SUM(n_tup_ins + n_tup_upd + n_tup_del), 0) FROM "
            "pg_stat_user_tables WHERE schemaname = %s", (schema,)).fetchone()[0])


def redis_commands(url: str) -> int:
    import redis

    r = redis.Redis.from_url(url)
    try:
        return int(r.info("stats")["total_commands_processed"])
    finally:
        r.close()


class Cluster:
    """`baton cluster up --nodes N` on free ports, its own schema and Redis prefix."""

    def __init__(self, n: int, args: argparse.Namespace) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix=f"baton-cluster{n}-"))
        self.schema = f"bench_cluster_{os.getpid()}_{n}_{uuid.uuid4().hex[:6]}"
        self.prefix = f"bench:{self.schema}:"
        self.port = common.free_port("127.0.0.10")
        node_port = common.free_port("127.0.0.11")
        grpc_port = common.free_port("127.0.0.11")
        self.log = self.workdir / "cluster-up.log"
        argv = [args.baton, "cluster", "up", "--nodes", str(n), "--port", str(self.port),
                "--node-port", str(node_port), "--grpc-port", str(grpc_port),
                "--dir", self.workdir / "c", "--store", f"{PG_URL}?schema={self.schema}",
                "--redis", args.redis, "--prefix", self.prefix, "--ping-interval", "1",
                "--config", args.config]
        self.proc = subprocess.Popen([str(a) for a in argv], stdout=open(self.log, "wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=common.REPO_DIR)
        info = self.workdir / "c" / "cluster.json"
        deadline = time.monotonic() + args.ready_timeout
        while not info.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"the cluster did not start: {common.log_tail(self.log)}")
            time.sleep(0.2)
        self.info = json.loads(info.read_text())
        time.sleep(2.0)                       # the dispatcher's first OPTIONS probes

    def node_pids(self, i: int) -> list[int]:
        return common.process_tree([self.info["nodes"][i]["pid"]])

    def kamailio_pids(self) -> list[int]:
        return common.process_tree([self.info["kamailio_pid"]])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        try:
            import psycopg

            with psycopg.connect(PG_URL, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
        except Exception as exc:       # the figures are taken; say what was left behind
            sys.stderr.write(f"schema {self.schema} not dropped: {exc}\n")


def measure(cluster: Cluster, target: tuple[str, int], label: str, args: argparse.Namespace,
            workdir: Path) -> dict[str, Any]:
    n = len(cluster.info["nodes"])
    meters = [common.CpuMeter(lambda i=i: cluster.node_pids(i)).start() for i in range(n)]
    kam = common.CpuMeter(cluster.kamailio_pids).start()
    rows0, cmds0 = pg_rows(cluster.schema), redis_commands(args.redis)
    result = common.run_sipp(target, args.rate, args.seconds, workdir / label,
                             scenario=SCENARIO, recv_timeout_ms=5000,
                             # SIPp on its own address, never the proxy's or a node's
                             extra_args=("-i", "127.0.0.1"))
    time.sleep(args.settle)         # the accountants post the last calls
    node_cpu = [m.stop() for m in meters]
    kam_cpu = kam.stop()
    rows, cmds = pg_rows(cluster.schema) - rows0, redis_commands(args.redis) - cmds0
    ok = max(1, result.successful)
    load1 = os.getloadavg()[0]
    return {
        "label": label, "nodes": n, "offered_rate": args.rate,
        "successful": result.successful, "failed": result.failed,
        "cps": round(result.cps, 1),
        "node_cpu_us_per_call": [round(c * 1e6 / ok, 1) for c in node_cpu],
        "nodes_cpu_us_per_call": round(sum(node_cpu) * 1e6 / ok, 1),
        "kamailio_cpu_us_per_call": round(kam_cpu * 1e6 / ok, 1) if label != "direct" else None,
        "pg_rows_per_call": round(rows / ok, 2),
        "redis_commands_per_call": round(cmds / ok, 2),
        "loadavg_1m": round(load1, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", default="1,2,3", help="cluster sizes to measure")
    p.add_argument("--rate", type=float, default=100.0, help="calls per second offered")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds of load per step")
    p.add_argument("--settle", type=float, default=2.0,
                   help="seconds after the load before the counters are read")
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    p.add_argument("--config", default=str(common.REPO_DIR / "examples" / "demo.toml"))
    p.add_argument("--baton", default=str(common.REPO_DIR / ".venv" / "bin" / "baton"))
    p.add_argument("--ready-timeout", type=float, default=90.0)
    p.add_argument("--no-files", action="store_true", help="accepted for `baton bench`")
    args = p.parse_args(argv)
    common.install_cleanup()
    workdir = Path(tempfile.mkdtemp(prefix="baton-bench-cluster-"))
    steps = []
    for n in (int(x) for x in args.nodes.split(",")):
        cluster = Cluster(n, args)
        try:
            if n == 1:
                node = cluster.info["nodes"][0]
                steps.append(measure(cluster, (node["address"], node["sip_port"]), "direct",
                                     args, workdir))
            steps.append(measure(cluster, ("127.0.0.10", cluster.port), f"kamailio-{n}",
                                 args, workdir))
        finally:
            cluster.stop()
    record = {"bench": "cluster", "rate": args.rate, "seconds": args.seconds,
              "cpus": os.cpu_count(), "steps": steps}
    direct = next((s for s in steps if s["label"] == "direct"), None)
    if direct:
        record["direct_cps"] = direct["cps"]
        record["direct_cpu_us_per_call"] = direct["nodes_cpu_us_per_call"]
    for s in steps:
        if s["label"] != "direct":
            record[f"cps_{s['nodes']}"] = s["cps"]
            record[f"kamailio_cpu_us_per_call_{s['nodes']}"] = s["kamailio_cpu_us_per_call"]
            record[f"nodes_cpu_us_per_call_{s['nodes']}"] = s["nodes_cpu_us_per_call"]
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
