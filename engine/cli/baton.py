"""The `baton` command."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

from engine import __version__
from engine.cli.common import print_session_history, run_loop


def _serve(args) -> int:
    from engine.config.load import ConfigError, load
    from engine.runtime.server import Engine
    from engine.common.guard import PRIVATE_UMASK

    # Stored data (ledger, journal, keys, outbox, recordings) is the engine user's only.
    os.umask(PRIVATE_UMASK)

    overrides = {"sip_addr": args.sip_addr, "grpc_addr": args.grpc_addr,
                 "data_dir": args.data_dir, "metrics_addr": args.metrics_addr,
                 "http_addr": args.http_addr,
                 "log_format": args.log_format, "node_id": args.node_id,
                 "drain_timeout": args.drain_timeout, "media_address": args.media_addr,
                 "cluster_redis": args.redis, "cluster_prefix": args.cluster_prefix,
                 "cluster_reservations": args.reservations}
    try:
        cfg = load(args.config, overrides)
    except ConfigError as exc:
        print(f"baton: bad config: {exc}", file=sys.stderr)
        return 2
    from engine.common.logs import setup as setup_logs

    setup_logs(args.log_level or cfg.log_level, cfg.log_format)

    async def main() -> int:
        engine = Engine(cfg)
        # Handlers first: a SIGTERM that arrives while starting still stops gracefully.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # SIGTERM drains for engine.drain_timeout, SIGUSR2 (`baton node drain`) until the
        # last call ends; SIGINT, or a second signal while draining, stops at once.
        drain: list[float | None] = []

        def on_signal(sig: int) -> None:
            if stop.is_set() or sig == signal.SIGINT or drain:
                drain[:] = [0.0]
            else:
                drain[:] = [None if sig == signal.SIGUSR2 else cfg.drain_timeout]
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            await engine.start()
        except OSError as exc:
            where = getattr(exc, "config_key", None) or f"{cfg.sip_host}:{cfg.sip_port}"
            print(f"baton: cannot listen on {where}: {exc}", file=sys.stderr)
            await engine.stop(timeout=0)   # let go of what did start
            return 1
        # Everything loaded at start-up lives as long as the engine: keep it out of the
        # collector's way, so full collections stay short under load.
        import gc

        gc.collect()
        gc.freeze()
        accountant = None
        if not args.no_accountant:
            accountant = await _supervise_accountant(engine, cfg, args.config, args.store)
        print(f"baton {__version__} serving SIP on {cfg.sip_host}:{engine.sip_port} "
              f"(config {cfg.path}, data {cfg.data_dir}); numbers: "
              f"{', '.join(sorted(cfg.numbers)) or 'none'}", file=sys.stderr, flush=True)
        hostport = f"{cfg.sip_host}:{engine.sip_port}"
        data = f" --data-dir {cfg.data_dir}"
        first = min(cfg.numbers, default='1000')
        print(f"  call it:       baton call {first} --engine {hostport} --hangup-after 5   "
              f"(or sipp -sn uac {hostport} -s {first} -m 1 -d 2000, or any softphone: "
              f"sip:NUMBER@{hostport})\n"
              f"  the tour:      baton demo   (its own engine, vendors, calls, invoice)\n"
              f"  see the calls: baton sessions list{data}\n"
              f"  the invoice:   baton bill invoice --account {next(iter(cfg.accounts), 'ACCOUNT')} "
              f"--period $(date -u +%Y-%m){data}"
              f"{' --config ' + args.config if args.config else ''}\n"
              f"  stop:          Ctrl-C (calls in progress get BYE)", file=sys.stderr, flush=True)
        if engine.metrics is not None:
            print(f"  metrics:       {engine.metrics.url}", file=sys.stderr, flush=True)
        if engine.http is not None and engine.http.rest is not None:
            print(f"  REST API:      {engine.http.url}/2010-04-01/Accounts/SID/Calls.json   "
                  f"(twilio Client(sid, auth_token), client.api.base_url = "
                  f"\"{engine.http.url}\"; docs/rest.md)", file=sys.stderr, flush=True)
        if engine.control is not None:
            from control.server import grpc_target

            where = next((f"accounts.{a}.api_tokens" for a, acc in cfg.accounts.items()
                          if getattr(acc, "api_tokens", None)), "an account's api_tokens")
            print(f"  live view:     baton top --engine {grpc_target(engine)} --token TOKEN"
                  f"   (TOKEN: one of {where} in the config)", file=sys.stderr, flush=True)
        pidfile = os.path.join(cfg.data_dir, "engine.pid")
        with open(pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")
        await stop.wait()
        if drain and drain[0] != 0.0:
            drain_task = asyncio.ensure_future(engine.drain_calls(drain[0]))
            stop.clear()
            interrupted = asyncio.ensure_future(stop.wait())
            await asyncio.wait((drain_task, interrupted), return_when=asyncio.FIRST_COMPLETED)
            interrupted.cancel()
            drain_task.cancel()
        with contextlib.suppress(OSError):
            os.unlink(pidfile)
        logging.getLogger("baton").info("stopping: ending %d calls", len(engine.sessions))
        await engine.stop()
        if accountant is not None:
            # After the engine's last stamps: the accountant drains them, then stops.
            await accountant.stop()
        return 0

    return run_loop(main())


def _sessions(args) -> int:
    import json
    import time

    from engine.sessions import journal as store

    if getattr(args, "cluster", None):
        from engine.cli.cluster import list_cluster_sessions

        return list_cluster_sessions(args.cluster, args.prefix, args.limit, args.format,
                                     args.token, args.account)
    try:
        if args.sessions_command == "list":
            live = True if args.live else False if args.finished else None
            rows = store.list_sessions(args.data_dir, live=live, limit=args.limit,
                                       account=args.account)
            if args.format == "json":
                print(json.dumps(rows, indent=2))
                return 0
            print(f"{'SESSION':<20} {'ACCOUNT':<10} {'NUMBER':<8} {'MODULE':<18} {'LEVEL':<12} "
                  f"{'STARTED':<20} {'STATE'}")
            for r in rows:
                started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["started_wall_ns"] / 1e9))
                state = "live" if r["live"] else f"ended ({r['end_reason']})"
                print(f"{r['id']:<20} {r['account']:<10} {r['number'] or '':<8} "
                      f"{r['module'] or '':<18} {r['level'] or '':<12} {started:<20} {state}")
            return 0
        row = store.get_session(args.data_dir, args.session_id)
    except FileNotFoundError as exc:
        print(f"baton: {exc}", file=sys.stderr)
        return 2
    if row is None:
        print(f"baton: no session {args.session_id!r} in {args.data_dir}", file=sys.stderr)
        return 1
    if args.format == "json":
        print(json.dumps(row, indent=2))
        return 0
    print_session_history(row)
    return 0


def _start_accountant(cfg, config_path, store=None):
    """The accountant as a child process on the same data directory."""
    import subprocess

    cmd = [sys.executable, "-m", "engine.accounting.accountant", "--data-dir", cfg.data_dir,
           "--node-id", cfg.node_id]
    if config_path:
        cmd += ["--config", config_path]
    if store:
        cmd += ["--store", store]
    log_path = os.path.join(cfg.data_dir, "accountant.log")
    out = open(log_path, "ab")
    cmd += ["--parent-pid", str(os.getpid()), "--log-format", cfg.log_format]
    if cfg.accountant_metrics_addr:
        cmd += ["--metrics-addr", cfg.accountant_metrics_addr]
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    out.close()
    logging.getLogger("baton").info("accountant started (pid %d, log %s)", proc.pid, log_path)
    return proc


async def _supervise_accountant(engine, cfg, config_path, store=None):
    """Start the accountant and keep it running (engine/runtime/supervisor.py); the
    gRPC health of Billing follows whether it is up."""
    from engine.accounting.accountant import ring_path
    from engine.accounting.lock import lock_path
    from engine.runtime.supervisor import AccountantSupervisor

    async def billing_health(up: bool) -> None:
        control = engine.control
        if control is None:
            return
        from proto import pb
        from grpc_health.v1 import health_pb2

        status = health_pb2.HealthCheckResponse.SERVING if up else \
            health_pb2.HealthCheckResponse.NOT_SERVING
        await control.health.set(pb.SERVICE_BILLING, status)

    sup = AccountantSupervisor(lambda: _start_accountant(cfg, config_path, store),
                               lock_path(ring_path(cfg.data_dir)), engine.stamper, billing_health)
    engine.accountant = sup
    await billing_health(False)      # until the accountant holds its lock
    sup.start()
    return sup


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="baton", description="Baton programmable telephony engine")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("serve", help="run the engine in the foreground",
                       description="Run the engine in the foreground; SIGTERM/SIGINT stop it "
                                   "gracefully (new calls get 503, calls in progress get BYE; "
                                   "with a drain timeout, SIGTERM first waits for them to end). "
                                   "SIGUSR2 drains until the last call ends, then stops.")
    s.add_argument("--config", metavar="PATH", help="TOML config (default: built-in defaults)")
    s.add_argument("--sip-addr", metavar="HOST:PORT", help="SIP listen address (overrides the config)")
    s.add_argument("--grpc-addr", metavar="HOST:PORT", help="gRPC listen address (overrides the config)")
    s.add_argument("--data-dir", metavar="DIR", help="data directory (overrides the config)")
    s.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    s.add_argument("--log-format", choices=("text", "json"),
                   help="text, or json: one JSON object per line with ts, level, logger, msg, "
                        "session (overrides engine.log_format)")
    s.add_argument("--metrics-addr", metavar="HOST:PORT",
                   help="serve Prometheus /metrics here (overrides engine.metrics_addr)")
    s.add_argument("--media-addr", metavar="IP",
                   help="address RTP binds to and advertises in SDP (overrides media.address)")
    s.add_argument("--node-id", metavar="ID",
                   help="this node's id in ring records and ledger keys (overrides engine.node_id)")
    s.add_argument("--store", metavar="URL",
                   help="the accountant's ledger store, e.g. postgresql://.../db?schema=NAME "
                        "(overrides billing.store)")
    s.add_argument("--drain-timeout", type=float, metavar="SECONDS",
                   help="on SIGTERM, wait this long for calls to end (new calls and OPTIONS "
                        "get 503) before ending them (overrides engine.drain_timeout)")
    s.add_argument("--http-addr", metavar="HOST:PORT",
                   help="serve recordings and the REST API here (overrides engine.http_addr)")
    s.add_argument("--redis", metavar="URL",
                   help="the cluster's session directory (overrides cluster.redis)")
    s.add_argument("--cluster-prefix", metavar="PREFIX",
                   help="prefix of the cluster's Redis keys (overrides cluster.prefix)")
    s.add_argument("--reservations", metavar="URL",
                   help="reserve prepaid grants and capped time from this PostgreSQL (the "
                        "cluster's ledger; overrides cluster.reservations)")
    s.add_argument("--no-accountant", action="store_true",
                   help="do not start the accountant process (run `baton accountant` yourself)")
    s.set_defaults(func=_serve)
    sub.add_parser("accountant", add_help=False,
                   help="drain the ring into the ledger (see `baton accountant --help`)")
    sub.add_parser("bill", add_help=False,
                   help="invoices and payouts (see `baton bill --help`)")
    sub.add_parser("bench", add_help=False,
                   help="run a benchmark next to the machine's baseline (see `baton bench --list`)")
    sub.add_parser("config", add_help=False,
                   help="check a config file, print the config reference (see `baton config --help`)")
    sub.add_parser("call", add_help=False,
                   help="place a test call with PJSIP: DTMF, play, record (see `baton call --help`)")
    sub.add_parser("text", add_help=False,
                   help="send a text (SIP MESSAGE) with PJSIP and print the replies "
                        "(see `baton text --help`)")

    sub.add_parser("load", add_help=False,
                   help="place calls with media at a rate against a SIP target and measure them")
    sub.add_parser("demo", add_help=False,
                   help="a guided tour: engine, vendors, calls, history, invoice, payouts "
                        "(see `baton demo --help`)")
    ss = sub.add_parser("sessions", help="list sessions and their history of control")
    ssub = ss.add_subparsers(dest="sessions_command", metavar="WHAT", required=True)
    sl = ssub.add_parser("list", help="sessions, newest first")
    sl.add_argument("--live", action="store_true", help="only calls in progress")
    sl.add_argument("--finished", action="store_true", help="only ended calls")
    sl.add_argument("--account", help="only this account")
    sl.add_argument("--limit", type=int, default=50)
    sl.add_argument("--cluster", metavar="REDIS_URL",
                    help="the live calls of every node of a cluster, from its session "
                         "directory (e.g. redis://127.0.0.1:6379/0; docs/cluster.md)")
    sl.add_argument("--prefix", default="baton:", help="with --cluster: the cluster's key "
                                                       "prefix (cluster.prefix)")
    sl.add_argument("--token", default=os.environ.get("BATON_TOKEN"),
                    help="with --cluster: an API token (default $BATON_TOKEN); each node's "
                         "control API then adds account, number, module and duration")
    sh = ssub.add_parser("history", help="one session's modules, levels and reasons")
    sh.add_argument("session_id", metavar="SESSION_ID")
    for p_ in (sl, sh):
        p_.add_argument("--data-dir", default=".baton", metavar="DIR",
                        help="the engine's data directory (default: .baton)")
        p_.add_argument("--format", choices=("table", "json"), default="table")
    ss.set_defaults(func=_sessions)
    from engine.accounting.client import add_cost_parser

    add_cost_parser(ssub)
    from engine.cli.queues import add_parser as add_queues_parser

    add_queues_parser(sub)
    from engine.cli.cluster import add_parsers as add_cluster_parsers

    add_cluster_parsers(sub)
    from engine.cli.top import add_parser as add_top_parser

    add_top_parser(sub)
    v = sub.add_parser("version", help="print the version")
    v.set_defaults(func=lambda a: print(f"baton {__version__}") or 0)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("accountant", "bill"):
        from engine.accounting import accountant

        return (accountant.main if argv[0] == "accountant" else accountant.bill_main)(argv[1:])
    if argv and argv[0] in ("bench", "config"):
        from engine.cli import bench as bench_cli
        from engine.config import doc as config_doc

        return (bench_cli.main if argv[0] == "bench" else config_doc.main)(argv[1:])
    if argv and argv[0] == "call":
        from engine.cli import call as caller

        return caller.main(argv[1:])
    if argv and argv[0] == "text":
        from engine.cli import text as texter

        return texter.main(argv[1:])

    if argv and argv[0] == "load":
        from engine.cli import load

        return load.main(argv[1:])
    if argv and argv[0] == "demo":
        from engine.cli import demo

        return demo.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
