"""A vendor process for tests that holds text conversations: it takes every offer,
answers each text it gets with `desk heard: BODY`, and on the text `BOT` releases
the conversation through `back`. It prints `TAKEN sid`, `TEXT sid body`,
`STATUS sid status` and `RELEASED sid`."""
from __future__ import annotations

import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from control.sdk import ControlLost, Offer, TextReceived  # noqa: E402
from control.sdk.cli import client_from_args, vendor_argument_parser  # noqa: E402


def main() -> int:
    args = vendor_argument_parser("a text desk for tests", "globex.desk").parse_args()

    async def run() -> None:
        client = client_from_args(args)

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

        await client.run_until_signalled()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
