"""The `baton` command."""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from . import __version__


def _serve(args) -> int:
    from .config import ConfigError, load
    from .server import Engine

    overrides = {"sip_addr": args.sip_addr, "grpc_addr": args.grpc_addr,
                 "data_dir": args.data_dir}
    try:
        cfg = load(args.config, overrides)
    except ConfigError as exc:
        print(f"baton: bad config: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, (args.log_level or cfg.log_level).upper()),
        format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)

    async def main() -> int:
        engine = Engine(cfg)
        try:
            await engine.start()
        except OSError as exc:
            print(f"baton: cannot listen on {cfg.sip_host}:{cfg.sip_port}: {exc}", file=sys.stderr)
            return 1
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(f"baton {__version__} serving SIP on {cfg.sip_host}:{engine.sip_port} "
              f"(config {cfg.path}, data {cfg.data_dir}); numbers: "
              f"{', '.join(sorted(cfg.numbers)) or 'none'}", file=sys.stderr, flush=True)
        await stop.wait()
        logging.getLogger("baton").info("stopping: ending %d calls", len(engine.sessions))
        await engine.stop()
        return 0

    return _run(main())


def _run(coro):
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="baton", description="Baton programmable telephony engine")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("serve", help="run the engine in the foreground",
                       description="Run the engine in the foreground; SIGTERM/SIGINT stop it "
                                   "gracefully (new calls get 503, calls in progress get BYE).")
    s.add_argument("--config", metavar="PATH", help="TOML config (default: built-in defaults)")
    s.add_argument("--sip-addr", metavar="HOST:PORT", help="SIP listen address (overrides the config)")
    s.add_argument("--grpc-addr", metavar="HOST:PORT", help="gRPC listen address (overrides the config)")
    s.add_argument("--data-dir", metavar="DIR", help="data directory (overrides the config)")
    s.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    s.set_defaults(func=_serve)
    v = sub.add_parser("version", help="print the version")
    v.set_defaults(func=lambda a: print(f"baton {__version__}") or 0)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
