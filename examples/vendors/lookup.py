#!/usr/bin/env python3
"""An account-balance line as a Baton vendor module (a process of its own).

It looks the caller up by the user part of their SIP From in a small table,
offers a menu ("1" balance, "2" an agent), says the balance, and leaves
through `done` (or through `agent` when the caller asks for one; the app
wires that outlet to wherever agents are). An unknown caller hears so and
leaves through `done`.

    python examples/vendors/lookup.py --engine 127.0.0.1:50051 \\
        --code acme.lookup --secret "$ACME_SECRET"
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from control.sdk import ControlLost, Offer, Say  # noqa: E402
from control.sdk.cli import client_from_args, vendor_argument_parser  # noqa: E402

log = logging.getLogger("lookup")

# A stand-in for the vendor's own database: caller -> balance in the account's currency.
BALANCES = {"alice": 120.50, "bob": 3.75, "tester": 42.50, "1001": 0.0}


def caller_of(params: dict) -> str:
    uri = str(params.get("From", ""))
    uri = uri[uri.find("<") + 1:] if "<" in uri else uri
    return uri.split(":", 1)[-1].split("@", 1)[0].split(";")[0]


def spoken_amount(amount: float) -> str:
    whole, cents = divmod(round(amount * 100), 100)
    return f"{whole} dollars and {cents} cents"


async def lookup(offer: Offer, timeout: float) -> None:
    who = caller_of(offer.call_params)
    balance = BALANCES.get(who)
    call = await offer.take()
    try:
        await call.answer()
        if balance is None:
            await call.say("Sorry, we could not find an account for the number you are "
                           "calling from. Goodbye.", wait=True)
            await call.release("done", {"lookup": "unknown-caller"})
            return
        await call.set_value("balance", balance)
        choice = await call.gather(num_digits=1, timeout=timeout, prompt=Say(
            "Press one to hear your balance, or two to speak to an agent."))
        if choice.digits == "2":
            await call.release("agent", {"lookup": "agent"})
            return
        await call.say(f"Your balance is {spoken_amount(balance)}. Goodbye.", wait=True)
        print(f"{call.session_id} {who} {balance:.2f}", flush=True)
        await call.release("done", {"lookup": "balance", "balance": balance})
    except ControlLost:
        log.info("session %s: the caller left", call.session_id)


async def main(args) -> None:
    client = client_from_args(args)

    @client.on_offer
    async def on_offer(offer: Offer) -> None:
        await lookup(offer, args.timeout)

    await client.run_until_signalled()


def parse_args(argv=None):
    ap = vendor_argument_parser(__doc__.splitlines()[0], "acme.lookup")
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for a key")
    return ap.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s",
                        stream=sys.stderr)
    asyncio.run(main(parse_args()))
