#!/usr/bin/env python3
"""A post-call survey as a Baton vendor module (a process of its own).

It asks each question with speech and collects one key per answer (a key
pressed during a question answers it at once), repeats a question once when
the key is not a valid answer, prints the answers as one JSON line (and POSTs
them with --post), stores them on the session (`survey.<question>` values),
thanks the caller and leaves through the `done` outlet.

    python examples/vendors/survey.py --engine 127.0.0.1:50051 \\
        --code acme.survey --secret "$ACME_SECRET"
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from control.sdk import Call, ControlLost, Offer, Say  # noqa: E402
from control.sdk.cli import client_from_args, vendor_argument_parser  # noqa: E402

log = logging.getLogger("survey")

# (key, question, valid keys)
QUESTIONS = [
    ("satisfaction", "On a scale of one to five, how satisfied were you with your call? "
                     "Press a key from one to five.", "12345"),
    ("recommend", "Would you recommend us to a friend? Press one for yes, or two for no.", "12"),
]


def caller_of(params: dict) -> str:
    """The user part of the caller's From (e.g. 'alice' of "Alice" <sip:alice@host>)."""
    uri = str(params.get("From", ""))
    uri = uri[uri.find("<") + 1:] if "<" in uri else uri
    user = uri.split(":", 1)[-1].split("@", 1)[0]
    return user.split(";")[0]


async def ask(call: Call, question: str, valid: str, timeout: float) -> str | None:
    for attempt in range(2):
        prompt = question if attempt == 0 else "Sorry, I did not get that. " + question
        result = await call.gather(num_digits=1, timeout=timeout, prompt=Say(prompt))
        if result.digits and result.digits in valid:
            return result.digits
    return None


def post(url: str, record: dict) -> None:
    req = urllib.request.Request(url, data=json.dumps(record).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:  # noqa: S310 (the operator's URL)
        r.read()


async def survey(offer: Offer, args) -> None:
    call = await offer.take()
    answers: dict[str, str | None] = {}
    try:
        await call.answer()
        for key, question, valid in QUESTIONS:
            answers[key] = await ask(call, question, valid, args.timeout)
            await call.set_value(f"survey.{key}", answers[key])
        record = {"session": call.session_id, "caller": caller_of(offer.call_params),
                  "answers": answers}
        print(json.dumps(record), flush=True)
        if args.post:
            try:
                await asyncio.get_running_loop().run_in_executor(None, post, args.post, record)
            except Exception as exc:   # the caller is not kept waiting for our web server
                log.warning("could not post the answers: %s", exc)
        await call.say("Thank you for your answers. Goodbye.", wait=True)
        await call.release("done", {f"survey_{k}": v for k, v in answers.items()})
    except ControlLost:
        log.info("session %s left the survey early (%s)", call.session_id, answers)


async def main(args) -> None:
    client = client_from_args(args)

    @client.on_offer
    async def on_offer(offer: Offer) -> None:
        await survey(offer, args)

    await client.run_until_signalled()


def parse_args(argv=None):
    ap = vendor_argument_parser(__doc__.splitlines()[0], "acme.survey")
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for a key")
    ap.add_argument("--post", default="", help="POST each survey's answers (JSON) to this URL")
    return ap.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s",
                        stream=sys.stderr)
    asyncio.run(main(parse_args()))
