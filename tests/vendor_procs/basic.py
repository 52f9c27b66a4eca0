"""A vendor process for tests: takes every offer and then, by --mode,
- hold: answers and says something in a loop until control ends;
- say-release: answers, says a greeting to its end, releases through `done`;
- silent: never answers an offer;
- decline: declines every offer;
and with --take-after S waits S seconds before it takes; with --discover it attaches
to every node of the engine's cluster (`NODES n1,n2` whenever that set changes).
It prints one line per event it cares about (`TAKEN sid`, `RELEASED sid`) and,
on SIGTERM, `STATS {json}`."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from control.sdk import ControlLost, Offer, VendorClient  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", required=True)
    ap.add_argument("--code", required=True)
    ap.add_argument("--secret", required=True)
    ap.add_argument("--mode", default="hold", choices=("hold", "say-release", "silent",
                                                        "decline"))
    ap.add_argument("--take-after", type=float, default=0.0)
    ap.add_argument("--discover", action="store_true")
    ap.add_argument("--text", default="Please hold, a vendor module has your call.")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    stats = {"offers": 0, "taken": 0, "released": 0, "lost": 0, "errors": 0}

    async def run() -> None:
        client = VendorClient(args.engine, args.code, args.secret, discover=args.discover)

        @client.on_offer
        async def on(offer: Offer) -> None:
            stats["offers"] += 1
            if args.mode == "silent":
                return
            if args.mode == "decline":
                await offer.decline("not today")
                return
            if args.take_after:
                await asyncio.sleep(args.take_after)
            call = await offer.take()
            stats["taken"] += 1
            print("TAKEN", call.session_id, flush=True)
            try:
                await call.answer()
                if args.mode == "hold":
                    await call.say(args.text, loop=0)
                    await call.revoked
                    return
                await call.say(args.text, wait=True)
                await call.release("done", {"greeted": True})
                stats["released"] += 1
                print("RELEASED", call.session_id, flush=True)
            except ControlLost:
                stats["lost"] += 1
            except Exception as exc:
                stats["errors"] += 1
                print("ERROR", call.session_id, repr(exc), flush=True)

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await client.start()
        print("READY", client.process_id, flush=True)
        nodes: list[str] = []
        while args.discover and not stop.is_set():
            if sorted(client.nodes) != nodes:
                nodes = sorted(client.nodes)
                print("NODES", ",".join(nodes), flush=True)
            try:
                await asyncio.wait_for(stop.wait(), 0.05)
            except asyncio.TimeoutError:
                pass
        await stop.wait()
        await client.close()
        print("STATS", json.dumps(stats), flush=True)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
