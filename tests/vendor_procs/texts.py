"""A vendor process for tests that holds text conversations: it takes every offer,
answers each text it gets with `desk heard: BODY`, and on the text `BOT` releases
the conversation through `back`. It prints `TAKEN sid`, `TEXT sid body`,
`STATUS sid status` and `RELEASED sid`."""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from control.sdk import ControlLost, Offer, TextReceived, VendorClient  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", required=True)
    ap.add_argument("--code", required=True)
    ap.add_argument("--secret", required=True)
    args = ap.parse_args()

    async def run() -> None:
        client = VendorClient(args.engine, args.code, args.secret)

        @client.on_offer
        async def on(offer: Offer) -> None:
            call = await offer.take()
            print("TAKEN", call.session_id, flush=True)
            try:
                while True:
                    ev = await call.events.get()
                    if not isinstance(ev, TextReceived):
                        continue
                    print("TEXT", call.session_id, ev.body, flush=True)
                    if ev.body.strip().upper() == "BOT":
                        await call.release("back")
                        print("RELEASED", call.session_id, flush=True)
                        return
                    st = await call.send_message(f"desk heard: {ev.body}", wait=True)
                    print("STATUS", call.session_id, st.status, st.sip_code, flush=True)
            except ControlLost:
                pass

        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await client.start()
        print("READY", client.process_id, flush=True)
        await stop.wait()
        await client.close()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
