"""`baton load TARGET`: place calls with real media from Baton's own UAC at a rate, run a
scenario on each, and report what SIPp cannot (see docs/load.md).

Exit status: 0 when the run completed (whatever the calls' results), 2 for bad input
(options, a scenario that does not load, a target that cannot be named), 3 when the
target does not answer, 130 after Ctrl-C (the final report is written first).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time

from engine.cli.common import run_loop

EXIT_BAD_INPUT = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="baton load", description=__doc__.split("\n\n")[0])
    p.add_argument("target", help="HOST:PORT, a SIP URI (sip:1001@host:port;transport=tcp), "
                                  "or trunk:NAME with --config")
    p.add_argument("--number", help="the user part dialled at HOST:PORT (default: none)")
    p.add_argument("--rate", type=float, default=10.0, help="calls per second (default 10)")
    stop = p.add_mutually_exclusive_group()
    stop.add_argument("--calls", type=int, help="place this many calls (default 100)")
    stop.add_argument("--duration", type=float, help="place calls for this many seconds")
    p.add_argument("--concurrent", type=int, default=1000,
                   help="at most this many calls up at once (default 1000)")
    p.add_argument("--hold", type=float, default=5.0,
                   help="seconds from the answer to our BYE (default 5)")
    p.add_argument("--ramp", type=float, default=0.0,
                   help="seconds over which the rate rises linearly to --rate (default 0)")
    p.add_argument("--scenario", default="answer-hold",
                   help="a built-in scenario (answer-hold, echo-check, ivr-walk, "
                        "dtmf-roundtrip) or a TOML file")
    p.add_argument("--transport", choices=("udp", "tcp"), help="default: the URI's, else udp")
    p.add_argument("--config", help="a Baton config whose [trunks.NAME] gives trunk:NAME "
                                    "its proxy and digest credentials")
    p.add_argument("--user", help="digest user name, when the target challenges")
    p.add_argument("--password", help="digest password")
    p.add_argument("--json", action="store_true", help="print the JSON summary on stdout")
    p.add_argument("--report", help="directory for summary.json, calls.csv and load.png "
                                    "(default baton-load-YYYYmmdd-HHMMSS)")
    p.add_argument("--local", default="127.0.0.1", help="local address for SIP and RTP")
    p.add_argument("--rtp-ports", default="40000-49999", help="local RTP port range LO-HI")
    p.add_argument("--media-to", help=argparse.SUPPRESS)   # tests: RTP via an impairment relay
    p.add_argument("--max-call", type=float, default=None,
                   help="end any call after this many seconds (default hold + 30)")
    p.add_argument("--no-probe", action="store_true",
                   help="do not send OPTIONS first to check the target is up")
    p.add_argument("--metrics-addr", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics while it runs "
                        "(port 0: any free port, printed on stderr)")
    p.add_argument("--quiet", action="store_true", help="no live view")
    return p


def _fail(msg: str, code: int = EXIT_BAD_INPUT) -> int:
    print(f"baton load: {msg}", file=sys.stderr)
    return code


def resolve_target(args):
    from engine.common.net import parse_hostport
    from engine.load.generator import Target
    from engine.sip.uri import parse_uri

    text = args.target.strip()
    creds = (args.user, args.password or "") if args.user else None
    if text.startswith("trunk:"):
        if not args.config:
            raise ValueError("trunk:NAME needs --config FILE with [trunks.NAME]")
        from engine.config.load import load

        cfg = load(args.config)
        trunk = cfg.trunks.get(text[6:])
        if trunk is None:
            raise ValueError(f"no [trunks.{text[6:]}] in {args.config} "
                             f"(trunks: {', '.join(cfg.trunks) or 'none'})")
        number = args.number or ""
        domain = trunk.domain or trunk.host
        uri = f"sip:{trunk.prefix}{number}@{domain}" if number else f"sip:{domain}"
        if trunk.username and creds is None:
            creds = (trunk.username, trunk.password)
        transport = (args.transport or trunk.transport).upper()
        return Target(uri, (trunk.host, trunk.port), transport, creds, domain)
    if text.startswith(("sip:", "sips:")):
        uri = parse_uri(text)
        if uri.scheme != "sip":
            raise ValueError("only sip: URIs (sips needs TLS)")
        transport = (args.transport or uri.transport or "udp").upper()
        return Target(text, (uri.host.strip("[]"), uri.port or 5060), transport, creds,
                      uri.host)
    host, port = parse_hostport(text)
    user = f"{args.number}@" if args.number else ""
    hp = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return Target(f"sip:{user}{hp}", (host, port), (args.transport or "udp").upper(), creds,
                  hp)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from engine.load import report, scenario as scenarios
    from engine.load.generator import LoadGenerator, Options, TargetError

    if args.rate <= 0:
        return _fail("--rate must be above 0 calls per second")
    if args.calls is not None and args.calls <= 0:
        return _fail("--calls must be at least 1")
    if args.duration is not None and args.duration <= 0:
        return _fail("--duration must be above 0 seconds")
    if args.concurrent < 1 or args.hold < 0 or args.ramp < 0:
        return _fail("--concurrent must be at least 1, --hold and --ramp not negative")
    try:
        lo, hi = (int(x) for x in args.rtp_ports.split("-"))
        if not 1024 <= lo < hi <= 65535:
            raise ValueError
    except ValueError:
        return _fail("--rtp-ports must be LO-HI within 1024-65535")
    if (hi - lo) // 2 < min(args.concurrent, args.calls or args.concurrent):
        print(f"baton load: note: {(hi - lo) // 2} RTP port pairs limit the calls up at once",
              file=sys.stderr)
    try:
        scenario = scenarios.load(args.scenario)
    except scenarios.ScenarioError as exc:
        return _fail(f"scenario does not load: {exc}")
    try:
        target = resolve_target(args)
    except Exception as exc:          # ConfigError, ValueError from the URI parser
        return _fail(f"bad target {args.target!r}: {exc}")
    opts = Options(rate=args.rate, calls=args.calls if args.calls is not None else
                   (None if args.duration is not None else 100), duration=args.duration,
                   concurrent=args.concurrent, hold=args.hold, ramp=args.ramp,
                   max_call=args.max_call or args.hold + 30.0, local_host=args.local,
                   rtp_ports=(lo, hi), media_to=args.media_to, probe=not args.no_probe)
    if args.metrics_addr:
        from engine.common.metrics import parse_addr

        try:
            parse_addr(args.metrics_addr)
        except ValueError as exc:
            return _fail(f"--metrics-addr: {exc}")
    report_dir = args.report or time.strftime("baton-load-%Y%m%d-%H%M%S")
    tty = sys.stderr.isatty()

    def view(gen) -> None:
        if args.quiet:
            return
        line = report.live_line(gen)
        if tty:
            print(f"\r\x1b[K{line}", end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    async def run() -> int:
        gen = LoadGenerator(target, scenario, opts, view)
        try:
            await gen.open()
        except OSError as exc:
            return _fail(f"cannot bind {args.local}: {exc}")
        metrics = None
        if args.metrics_addr:
            from engine.common.metrics import start_load_metrics

            try:
                metrics = await start_load_metrics(gen, args.metrics_addr)
            except OSError as exc:
                await gen.close()
                return _fail(f"--metrics-addr {args.metrics_addr}: {exc.strerror or exc}")
            print(f"baton load: metrics at {metrics.url}", file=sys.stderr, flush=True)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, gen.stop)
        try:
            try:
                if opts.probe:
                    try:
                        await gen.probe()
                    except TargetError as exc:
                        return _fail(str(exc), EXIT_UNREACHABLE)
                await gen.run()
                await asyncio.sleep(0.1)        # the last BYEs leave before the sockets close
            finally:
                await gen.close()
            if tty and not args.quiet:
                print(file=sys.stderr)
            view(gen)
            data = summary = report.summary(gen)
            files = report.write(gen, data, report_dir)
            rate = summary["rate"]
            if rate["short_of_offered"]:
                print(f"baton load: could not produce {rate['offered']:g} calls/s: achieved "
                      f"{rate['achieved_steady']:g} calls/s (this machine, or --concurrent "
                      f"{opts.concurrent}, is the limit)", file=sys.stderr)
            if args.json:
                print(json.dumps(data, indent=2))
            c = summary["calls"]
            print(f"baton load: {c['completed']} calls, {c['answered']} answered "
                  f"(ASR {c['asr_pct']} %), codes {c['codes']}; loss "
                  f"{summary['rtp']['loss_pct']} %, MOS mean {summary['quality']['mos']['mean']}; "
                  f"report: {', '.join(files)}", file=sys.stderr)
            return EXIT_INTERRUPTED if gen.interrupted else 0
        finally:
            # Up until the final report is written: a last scrape sees the whole run.
            if metrics is not None:
                await metrics.stop()

    return run_loop(run())
