"""`baton cluster up` (Kamailio's dispatcher in front of N nodes on this machine)
and `baton node drain` (docs/cluster.md).

`cluster up` fills in deploy/kamailio/kamailio.cfg, starts Kamailio on the front
address (127.0.0.10) and N `baton serve` nodes on 127.0.0.11, .12, ..., each with
its own data directory and node id, SIP, gRPC and HTTP (REST) on its own address, all posting into one ledger (`--store`, one
PostgreSQL schema per cluster), prints where everything is, writes it to
DIR/cluster.json, and stops it all on Ctrl-C or SIGTERM.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEMPLATE = os.path.join(ROOT, "deploy", "kamailio", "kamailio.cfg")
MODULES = "/usr/lib/x86_64-linux-gnu/kamailio/modules"
DEFAULT_STORE = "postgresql://postgres@127.0.0.1:5432/postgres?schema=baton_cluster"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
ALGORITHMS = {"round-robin": 4, "call-load": 10}


def render_kamailio(listen: str, port: int, dispatcher_list: str, ping_interval: int,
                    algorithm: int) -> str:
    """The Kamailio config of deploy/kamailio/kamailio.cfg for these values."""
    with open(TEMPLATE) as f:
        text = f.read()
    if algorithm == 10:      # call load counts dialogs: the dialog module tracks them
        text = text.replace('loadmodule "dispatcher.so"',
                            'loadmodule "dialog.so"\nloadmodule "dispatcher.so"')
        text = text.replace("record_route();", "record_route();\n        dlg_manage();")
    for name, value in (("LISTEN", listen), ("PORT", port), ("LIST", dispatcher_list),
                        ("PING", ping_interval), ("ALGORITHM", algorithm)):
        text = text.replace(f"@@{name}@@", str(value))
    return text


def dispatcher_list(nodes: list[dict]) -> str:
    """Set 1: every node's SIP address."""
    return "".join(f"1 sip:{n['address']}:{n['sip_port']} 0 0 name={n['id']}\n" for n in nodes)


def _options_ok(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        s.settimeout(0.3)
        local = s.getsockname()[1]
        msg = (f"OPTIONS sip:{host}:{port} SIP/2.0\r\n"
               f"Via: SIP/2.0/UDP {host}:{local};branch=z9hG4bK-up{time.monotonic_ns()}\r\n"
               f"Max-Forwards: 70\r\nFrom: <sip:up@{host}>;tag=up\r\nTo: <sip:{host}:{port}>\r\n"
               f"Call-ID: up-{time.monotonic_ns()}@{host}\r\nCSeq: 1 OPTIONS\r\n"
               f"Content-Length: 0\r\n\r\n").encode()
        try:
            s.sendto(msg, (host, port))
            return s.recv(65535).startswith(b"SIP/2.0 200")
        except OSError:
            return False


def _stop(procs: list[subprocess.Popen], sig: int, timeout: float) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(OSError):
                p.send_signal(sig)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _write_info(base: str, info: dict) -> None:
    """DIR/cluster.json, replaced whole: a reader never sees half of it."""
    tmp = os.path.join(base, "cluster.json.tmp")
    with open(tmp, "w") as f:
        json.dump(info, f, indent=2)
    os.replace(tmp, os.path.join(base, "cluster.json"))


def _start_node(n: dict) -> subprocess.Popen:
    with open(n["log"], "ab") as log:
        p = subprocess.Popen(n["cmd"], stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL)
    n["pid"] = p.pid
    n["starts"] = n.get("starts", 0) + 1
    return p


def up(args) -> int:
    kamailio = shutil.which("kamailio") or "/usr/sbin/kamailio"
    if not os.path.exists(kamailio):
        print("baton cluster: kamailio is not installed (Debian package kamailio)", file=sys.stderr)
        return 2
    base = os.path.abspath(args.dir)
    os.makedirs(base, exist_ok=True)
    first = ipaddress.ip_address(args.first_node)
    nodes = []
    for i in range(args.nodes):
        addr = str(first + i)
        nodes.append({"id": f"node{i + 1}", "address": addr, "sip_port": args.node_port,
                      "grpc": f"{addr}:{args.grpc_port}", "http": f"{addr}:{args.http_port}",
                      "data_dir": os.path.join(base, f"node{i + 1}"),
                      "log": os.path.join(base, f"node{i + 1}.log")})
    ds_list = os.path.join(base, "dispatcher.list")
    with open(ds_list, "w") as f:
        f.write(dispatcher_list(nodes))
    cfg_path = os.path.join(base, "kamailio.cfg")
    with open(cfg_path, "w") as f:
        f.write(render_kamailio(args.front, args.port, ds_list, args.ping_interval,
                                ALGORITHMS[args.algorithm]))
    rundir = os.path.join(base, "kamailio-run")
    os.makedirs(rundir, exist_ok=True)
    check = subprocess.run([kamailio, "-c", "-f", cfg_path, "-L", MODULES],
                           capture_output=True, text=True)
    if check.returncode != 0:
        print(f"baton cluster: bad Kamailio config {cfg_path}:\n{check.stderr}", file=sys.stderr)
        return 2
    procs: list[subprocess.Popen] = []
    stopping: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _f: stopping.append(s))
    baton = os.path.join(os.path.dirname(sys.executable), "baton")
    try:
        for n in nodes:
            os.makedirs(n["data_dir"], exist_ok=True)
            cmd = [baton, "serve", "--config", args.config, "--node-id", n["id"],
                   "--sip-addr", f"{n['address']}:{n['sip_port']}", "--media-addr", n["address"],
                   "--grpc-addr", n["grpc"], "--http-addr", n["http"], "--data-dir", n["data_dir"], "--store", args.store,
                   "--drain-timeout", str(args.drain_timeout)]
            if args.redis:
                cmd += ["--redis", args.redis, "--cluster-prefix", args.prefix]
            if args.store.startswith(("postgresql://", "postgres://")):
                cmd += ["--reservations", args.store]   # prepaid funds and caps shared by the nodes
            n["cmd"] = cmd
            procs.append(_start_node(n))
        klog = os.path.join(base, "kamailio.log")
        with open(klog, "ab") as log:
            front = subprocess.Popen([kamailio, "-DD", "-E", "-f", cfg_path, "-L", MODULES,
                                      "-Y", rundir, "-P", os.path.join(rundir, "kamailio.pid")],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        procs.append(front)
        deadline = time.monotonic() + args.start_timeout
        waiting = list(nodes)
        while waiting and not stopping:
            for p in procs:
                if p.poll() is not None:
                    which = "kamailio" if p is front else next(n["id"] for n in nodes
                                                               if n["pid"] == p.pid)
                    print(f"baton cluster: {which} exited ({p.returncode}) while starting; "
                          f"see {base}/{'kamailio' if p is front else which}.log",
                          file=sys.stderr)
                    return 1
            waiting = [n for n in waiting if not _options_ok(n["address"], n["sip_port"])]
            if time.monotonic() > deadline:
                print(f"baton cluster: {', '.join(n['id'] for n in waiting)} did not start "
                      f"within {args.start_timeout:.0f}s", file=sys.stderr)
                return 1
            time.sleep(0.2)
        info = {"front": f"{args.front}:{args.port}", "kamailio_pid": front.pid,
                "kamailio_cfg": cfg_path, "kamailio_log": klog, "store": args.store,
                "redis": args.redis, "prefix": args.prefix, "nodes": nodes}
        _write_info(base, info)
        print(f"baton cluster: {len(nodes)} nodes behind Kamailio on sip:{args.front}:{args.port}"
              f" (config {cfg_path}, log {klog})", flush=True)
        for n in nodes:
            print(f"  {n['id']}: sip:{n['address']}:{n['sip_port']}  grpc {n['grpc']}  "
                  f"http://{n['http']}  data {n['data_dir']}  log {n['log']}  pid {n['pid']}", flush=True)
        if args.redis:
            print(f"  session directory: {args.redis} (prefix {args.prefix!r}); every node's "
                  f"calls: baton sessions list --cluster {args.redis} --prefix '{args.prefix}'"
                  f"\n  live view of every node: baton top --cluster {args.redis} "
                  f"--prefix '{args.prefix}' --token TOKEN", flush=True)
        print(f"  ledger: {args.store}\n"
              f"  call it: sipp -sn uac {args.front}:{args.port} -s 1000 -m 10 -d 2000 "
              f"-i 127.0.0.1\n"
              f"  drain a node: baton node drain --data-dir {nodes[0]['data_dir']}\n"
              f"  stop: Ctrl-C", flush=True)
        while not stopping:
            for i, (n, p) in enumerate(zip(nodes, procs)):
                if p.poll() is not None and not stopping and "exited" not in n:
                    # Drained (`baton node drain`) or killed: the node comes back, which
                    # makes a rolling restart one `baton node drain` per node.
                    print(f"baton cluster: {n['id']} exited ({p.returncode})"
                          f"{'; starting it again' if args.restart else ''}", flush=True)
                    if not args.restart:
                        n["exited"] = p.returncode
                        continue
                    procs[i] = _start_node(n)
                    _write_info(base, info)
            if front.poll() is not None:
                print(f"baton cluster: kamailio exited ({front.returncode})", file=sys.stderr)
                return 1
            time.sleep(0.2)
        return 0
    finally:
        # Nodes first (their calls end with BYE through the proxy), then the proxy.
        _stop(procs[:-1] if len(procs) > len(nodes) else procs, signal.SIGINT, 20)
        _stop(procs, signal.SIGTERM, 10)


def drain(args) -> int:
    """Send the node SIGUSR2 (drain until its last call ends, then exit) and wait."""
    pidfile = os.path.join(args.data_dir, "engine.pid")
    try:
        with open(pidfile) as f:
            pid = int(f.read().strip())
        os.kill(pid, signal.SIGUSR2)
    except (OSError, ValueError) as exc:
        print(f"baton node drain: no running engine in {args.data_dir}: {exc}", file=sys.stderr)
        return 1
    print(f"baton node drain: node (pid {pid}) refuses new calls and stops after its last call",
          flush=True)
    if args.no_wait:
        return 0
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    while os.path.exists(f"/proc/{pid}") and _is_baton(pid):
        if deadline is not None and time.monotonic() > deadline:
            print(f"baton node drain: still draining after {args.timeout:.0f}s", file=sys.stderr)
            return 1
        time.sleep(0.2)
    return 0


def list_cluster_sessions(url: str, prefix: str, limit: int, fmt: str,
                          token: str | None = None, account: str | None = None) -> int:
    """`baton sessions list --cluster URL`: every live session of the cluster and its node,
    from the session directory; with `token`, each node's control API adds what the
    call is (account, number, module, duration): the view of `baton top --cluster`."""
    import asyncio

    from engine.sessions.directory import DirectoryUnavailable, SessionDirectory

    if token:
        return _list_cluster_calls(url, prefix, limit, fmt, token, account)

    async def read() -> dict:
        d = SessionDirectory(url, prefix, "", "", list)
        try:
            return await d.entries()
        finally:
            await d.redis.aclose()

    try:
        entries = asyncio.run(read())
    except DirectoryUnavailable as exc:
        print(f"baton sessions: the session directory at {url} cannot be read: {exc}",
              file=sys.stderr)
        return 1
    rows = sorted(({"id": sid, "node": o.node, "grpc": o.grpc} for sid, o in entries.items()),
                  key=lambda r: (r["node"], r["id"]))[:limit]
    if fmt == "json":
        print(json.dumps(rows, indent=2))
        return 0
    per_node: dict[str, int] = {}
    for o in entries.values():
        per_node[o.node] = per_node.get(o.node, 0) + 1
    print(f"{len(entries)} live sessions: " + ", ".join(f"{n} {c}" for n, c in
                                                        sorted(per_node.items())))
    print(f"{'SESSION':<20} {'NODE':<10} GRPC")
    for r in rows:
        print(f"{r['id']:<20} {r['node']:<10} {r['grpc']}")
    return 0


def _list_cluster_calls(url: str, prefix: str, limit: int, fmt: str, token: str,
                        account: str | None) -> int:
    import asyncio
    import time as _time

    from engine.cli.top import Cluster, Frame, TopError

    async def read() -> Frame:
        cluster = Cluster(url, prefix)
        frame = Frame(taken=_time.monotonic())
        try:
            await cluster.fill(token, 10_000, False, frame)
        finally:
            await cluster.close()
        return frame

    try:
        frame = asyncio.run(read())
    except TopError as exc:
        print(f"baton sessions: {exc}", file=sys.stderr)
        return 1
    calls = [r for r in frame.rows if not account or r.account == account][:limit]
    for note in frame.notes:
        print(f"baton sessions: {note}", file=sys.stderr)
    if fmt == "json":
        print(json.dumps([{"id": r.session_id, "node": r.node, "account": r.account,
                           "number": r.number, "caller": r.caller, "module": r.module,
                           "level": r.level, "seconds": round(r.seconds, 1)} for r in calls],
                         indent=2))
        return 0
    print(f"{frame.live} live calls on {len(frame.nodes)} nodes: " + ", ".join(
        f"{n} {'DOWN' if c is None else c}" for n, c in frame.nodes.items()))
    print(f"{'SESSION':<20} {'NODE':<10} {'ACCOUNT':<14} {'NUMBER':<10} {'MODULE':<22} "
          f"{'DURATION':>9}")
    for r in calls:
        s = int(r.seconds)
        print(f"{r.session_id:<20} {r.node[:10]:<10} {(r.account or '-')[:14]:<14} "
              f"{r.number[:10]:<10} {r.module[:22]:<22} "
              f"{s // 3600:>3}:{s % 3600 // 60:02d}:{s % 60:02d}")
    return 0


def _is_baton(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] not in ("Z", "X")
    except OSError:
        return False


def add_parsers(sub) -> None:
    c = sub.add_parser("cluster", help="Kamailio and N nodes on this machine (docs/cluster.md)")
    csub = c.add_subparsers(dest="cluster_command", metavar="WHAT", required=True)
    u = csub.add_parser("up", help="start Kamailio on 127.0.0.10 and N nodes on 127.0.0.11, ...; "
                                   "Ctrl-C stops them all")
    u.add_argument("--nodes", type=int, default=3)
    u.add_argument("--port", type=int, default=5060, help="Kamailio's SIP port (default 5060)")
    u.add_argument("--front", default="127.0.0.10", help="Kamailio's address")
    u.add_argument("--first-node", default="127.0.0.11", help="the first node's address; the "
                                                              "next nodes take the next ones")
    u.add_argument("--node-port", type=int, default=5060, help="every node's SIP port")
    u.add_argument("--grpc-port", type=int, default=50051, help="every node's gRPC port")
    u.add_argument("--http-port", type=int, default=8080,
                   help="every node's HTTP port: its REST API and recordings (default 8080)")
    u.add_argument("--config", default=os.path.join(ROOT, "examples", "demo.toml"),
                   help="the nodes' TOML config (default: examples/demo.toml)")
    u.add_argument("--store", default=os.environ.get("BATON_CLUSTER_STORE", DEFAULT_STORE),
                   help="the one ledger every node's accountant posts into "
                        f"(default {DEFAULT_STORE})")
    u.add_argument("--redis", default=os.environ.get("BATON_CLUSTER_REDIS", DEFAULT_REDIS),
                   help="the session directory every node writes into "
                        f"(default {DEFAULT_REDIS}; '' for none)")
    u.add_argument("--prefix", default="baton:", help="the cluster's Redis key prefix")
    u.add_argument("--dir", default=".baton-cluster", help="where the nodes' data directories, "
                                                          "logs and the Kamailio config go")
    u.add_argument("--ping-interval", type=int, default=2, help="seconds between OPTIONS probes")
    u.add_argument("--algorithm", choices=sorted(ALGORITHMS), default="round-robin")
    u.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds a node given SIGTERM waits for its calls (default 30)")
    u.add_argument("--start-timeout", type=float, default=60.0)
    u.add_argument("--no-restart", dest="restart", action="store_false",
                   help="leave a node that exits (drained or killed) stopped; by default it "
                        "is started again")
    u.set_defaults(func=up)
    n = sub.add_parser("node", help="this node in a cluster: drain")
    nsub = n.add_subparsers(dest="node_command", metavar="WHAT", required=True)
    d = nsub.add_parser("drain", help="refuse new calls and OPTIONS (503), finish the calls in "
                                      "progress, then exit")
    d.add_argument("--data-dir", default=".baton", metavar="DIR")
    d.add_argument("--no-wait", action="store_true", help="do not wait for the node to exit")
    d.add_argument("--timeout", type=float, help="give up waiting after this many seconds")
    d.set_defaults(func=drain)
