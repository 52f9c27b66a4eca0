"""`baton text NUMBER "hello"`: send a text (SIP MESSAGE, RFC 3428) with PJSIP and print the replies.

The sibling of `baton call`: the same PJSIP phone (engine/cli/call.py), bound to
and advertised as `--bind`; the MESSAGE's final status is printed, then every
text that comes back within `--wait` seconds (the first `--replies` of them).
Exit status 0 when the engine accepted the text (2xx), 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import time

from engine.cli.call import DEFAULT_ENGINE, CallerError, Phone, pj, pjsip_present, target_uri


class TextAccount(pj.Account if pj else object):
    """A phone account that keeps the texts it receives and its sent texts' statuses."""

    def __init__(self):
        super().__init__()
        self.received: list[dict] = []
        self.statuses: list[tuple[int, str]] = []

    def onInstantMessage(self, prm) -> None:
        self.received.append({"from": prm.fromUri, "body": prm.msgBody,
                              "content_type": prm.contentType})

    def onInstantMessageStatus(self, prm) -> None:
        self.statuses.append((prm.code, prm.reason))


class TextPhone(Phone):
    account_class = TextAccount

    def text(self, uri: str, body: str):
        """Send `body` to `uri`; the Buddy (keep it while its status is awaited)."""
        cfg = pj.BuddyConfig()
        cfg.uri = uri
        cfg.subscribe = False
        buddy = pj.Buddy()
        buddy.create(self.acc, cfg)
        prm = pj.SendInstantMessageParam()
        prm.content = body
        prm.contentType = "text/plain"
        try:
            buddy.sendInstantMessage(prm)
        except pj.Error as exc:
            raise CallerError(f"cannot text {uri}: {exc.reason}") from None
        return buddy


def send_text(uri: str, body: str, *, bind: str = "127.0.0.1", from_user: str = "baton-text",
              wait: float = 5.0, replies: int = 1, user: str | None = None,
              password: str | None = None) -> dict:
    """Text `uri` and collect up to `replies` texts back within `wait` seconds."""
    with TextPhone(bind=bind, from_user=from_user, user=user, password=password) as phone:
        acc = phone.acc
        buddy = phone.text(uri, body)
        phone.settle(lambda: acc.statuses, 40.0)
        status, reason = acc.statuses[-1] if acc.statuses else (0, "no answer")
        if 200 <= status < 300:
            phone.settle(lambda: len(acc.received) >= replies, wait)
            # A reply's 200 must reach the engine before the phone goes away.
            phone.pump(0.1)
        out = {"uri": uri, "status": status, "reason": reason, "replies": list(acc.received)}
        del buddy
        return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="baton text", description=__doc__.split("\n\n")[0])
    p.add_argument("target", metavar="NUMBER|URI", help="a number of the engine, user@host or a SIP URI")
    p.add_argument("body", metavar="TEXT", help="the text to send")
    p.add_argument("--engine", default=DEFAULT_ENGINE, metavar="HOST:PORT",
                   help=f"the engine a bare number is texted at (default {DEFAULT_ENGINE})")
    p.add_argument("--from", dest="from_user", default="baton-text", metavar="USER",
                   help="the From user (default baton-text)")
    p.add_argument("--user", help="digest username, used when challenged")
    p.add_argument("--password", help="digest password")
    p.add_argument("--wait", type=float, default=5.0, metavar="SECONDS",
                   help="how long to wait for replies (default 5)")
    p.add_argument("--replies", type=int, default=1, metavar="N",
                   help="stop waiting after N replies (default 1)")
    p.add_argument("--bind", default="127.0.0.1", metavar="ADDR",
                   help="the address PJSIP binds to and advertises (default 127.0.0.1)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if not args.body:
        p.error("nothing to send: give a text")
    try:
        uri = target_uri(args.target, args.engine)
        socket.inet_aton(args.bind)
    except (ValueError, OSError) as exc:
        p.error(str(exc))
    if not pjsip_present("baton text"):
        return 2
    t0 = time.monotonic()
    try:
        result = send_text(uri, args.body, bind=args.bind, from_user=args.from_user,
                           wait=args.wait, replies=args.replies, user=args.user,
                           password=args.password)
    except (CallerError, OSError) as exc:
        print(f"baton text: {uri} failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1
    result["seconds"] = round(time.monotonic() - t0, 3)
    if args.json:
        print("RESULT " + json.dumps(result), flush=True)
    else:
        print(f"{uri}: {result['status']} {result['reason']}", flush=True)
        for r in result["replies"]:
            print(f"reply from {r['from']}: {r['body']}", flush=True)
    ok = 200 <= result["status"] < 300
    if not ok:
        print(f"baton text: {uri} failed: {result['status']} {result['reason']}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
