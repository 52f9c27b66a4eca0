"""The accountant's side of `baton.v1.Billing`, and its notifications.

The accountant serves Billing over gRPC on a unix socket in the data
directory (`billing_address(DATA)`); the engine's control API forwards its
clients' calls there after checking their tokens, so this server trusts
whoever can open the socket (the data directory's permissions) and scopes
nothing itself.

Threads: gRPC handlers run on a small pool. What reads the live meter
(Cost, Balance) is handed to the accountant's own loop (`Accountant.calls`,
run between batches), so no handler ever sees a half-rated batch; when the
loop is not running (a test driving the accountant by hand), the handler
runs it itself under a lock. Invoices and payouts read committed rows
through a connection of their own.

`Notifier` turns the policy snapshots the accountant writes into
notifications: `balance.low` once each time an account's funds left fall
below its threshold, `cap.reached` once per capped target and period, and
`invoice.ready` once per account and period after the period has closed.
Each is a signed webhook (engine/common/webhooks.py, the accountant's own outbox)
and a `Billing.Events` message, which the engine turns into `Sessions.Watch`
events.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import queue
import re
import tempfile
import threading
import time
from decimal import Decimal

from engine.common.guard import private_dir
from typing import Any, Callable

log = logging.getLogger("baton.accountant.service")

__all__ = ["billing_address", "BillingServer", "start_service", "BackgroundService", "Notifier",
           "PERIOD_RE",
           "check_period", "money_pb"]

PERIOD_RE = re.compile(r"^\d{4}-(0[1-9]|1[0-2])(-(0[1-9]|[12]\d|3[01]))?$")
ACCOUNT_RE = re.compile(r"^[A-Za-z0-9_.@:+-]{1,128}$")
CALL_TIMEOUT = 10.0
EVENT_QUEUE = 10_000


def billing_address(data_dir: str) -> str:
    """The gRPC address of the accountant's Billing service for a data directory:
    `unix:DATA/accountant.sock`, or, when that path is too long for a unix socket,
    a short path named after it in `baton-UID/` under $XDG_RUNTIME_DIR (else the
    temporary directory), a directory only this user may enter. Never an abstract
    socket: those have no permissions, so any local user could connect."""
    path = os.path.join(os.path.abspath(data_dir), "accountant.sock")
    if len(path.encode()) <= 100:
        return "unix:" + path
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return "unix:" + os.path.join(base, f"baton-{os.getuid()}",
                                  hashlib.sha256(path.encode()).hexdigest()[:24] + ".sock")


def check_period(period: str) -> str | None:
    """A problem with a period label, or None."""
    if not period:
        return "period: required, e.g. 2026-11"
    if not PERIOD_RE.match(period):
        return f"period: {period!r} is not a period such as 2026-11 (or 2026-11-05)"
    return None


def check_account(account: str) -> str | None:
    if not account:
        return "account: required"
    if not ACCOUNT_RE.match(account):
        return f"account: {account[:64]!r} is not an account id"
    return None


def money_pb(micros: int, currency: str):
    """A `baton.v1.Money`."""
    from proto import pb

    from engine.accounting.money import format_money

    return pb.billing_pb2.Money(micros=int(micros), amount=format_money(int(micros)),
                                currency=currency or "")


def invoice_pb(doc: dict):
    """An invoice dict (invoices.invoice) as an `AccountInvoice`."""
    from proto import pb

    bp = pb.billing_pb2
    out = bp.AccountInvoice(account=doc["account"], period=doc["period"],
                            currency=doc["currency"] or "")
    for ln in doc["lines"]:
        line = bp.InvoiceLine(module=ln["module"], level=ln.get("level", ""), item=ln["item"],
                              plan=ln["plan"],
                              quantity=ln["quantity"], unit=ln["unit"],
                              amount=money_pb(ln["amount_micro"], ln["currency"]),
                              transactions=ln["transactions"])
        if ln["unit_price"] is not None:
            line.unit_price.CopyFrom(money_pb(int(Decimal(ln["unit_price"]) * 1_000_000),
                                              ln["currency"]))
        out.lines.append(line)
    if doc["total_micro"] is not None:
        out.total.CopyFrom(money_pb(doc["total_micro"], doc["currency"]))
    for cur, amount in doc["totals"].items():
        out.totals.append(money_pb(int(Decimal(amount) * 1_000_000), cur))
    return out


def payouts_pb(doc: dict):
    """A payouts report dict (invoices.payouts) as a `PayoutsReport`."""
    from proto import pb

    bp = pb.billing_pb2
    out = bp.PayoutsReport(period=doc["period"], vendor=doc["vendor"] or "")
    for st in doc["statements"]:
        cur = st["currency"]
        s = bp.PayoutStatement(vendor=st["vendor"], period=st["period"], currency=cur,
                               gross=money_pb(st["gross_micro"], cur),
                               platform_share=money_pb(st["platform_share_micro"], cur),
                               total=money_pb(st["total_micro"], cur))
        for ln in st["lines"]:
            s.lines.append(bp.PayoutLine(module=ln["module"], item=ln["item"],
                                         transactions=ln["transactions"],
                                         accounts=ln["accounts"],
                                         gross=money_pb(ln["gross_micro"], cur),
                                         platform_share=money_pb(ln["platform_share_micro"], cur),
                                         payout=money_pb(ln["payout_micro"], cur)))
        out.statements.append(s)
    if doc["total_micro"] is not None and doc["currency"]:
        out.total.CopyFrom(money_pb(doc["total_micro"], doc["currency"]))
    totals: dict[str, int] = {}
    for st in doc["statements"]:
        totals[st["currency"]] = totals.get(st["currency"], 0) + st["total_micro"]
    for cur, micros in totals.items():
        out.totals.append(money_pb(micros, cur))
    return out


class _Reader:
    """A connection of its own to the ledger, for committed rows (thread-safe)."""

    def __init__(self, acct) -> None:
        self.acct = acct
        self.lock = threading.Lock()
        self._ledger = None

    def __call__(self, fn: Callable[[Any], Any]) -> Any:
        from engine.accounting.ledgers import open_ledger

        with self.lock:
            if self._ledger is None:
                main = self.acct.ledger
                self._ledger = open_ledger(getattr(main, "path", None) or main.url,
                                           self.acct.data_dir)
            try:
                return fn(self._ledger)
            except Exception:
                # A broken connection (a restarted PostgreSQL): reopen next time.
                self.close_locked()
                raise

    def close_locked(self) -> None:
        if self._ledger is not None:
            try:
                self._ledger.close()
            except Exception as exc:    # a broken connection closes with whatever its driver raises
                log.warning("ledger close failed (reopened on next use): %s", exc)
            self._ledger = None

    def close(self) -> None:
        with self.lock:
            self.close_locked()


class BillingServer:
    """The gRPC server of one accountant; `stop()` ends it."""

    def __init__(self, acct, raw: dict | None = None, address: str | None = None) -> None:
        from engine.common.webhooks import SyncWebhooks, WebhookSettings

        self.acct = acct
        self.address = address or billing_address(acct.data_dir)
        self.reader = _Reader(acct)
        self._direct = threading.Lock()
        self._subscribers: set[queue.Queue] = set()
        self._sub_lock = threading.Lock()
        self.webhooks = SyncWebhooks(WebhookSettings.from_raw(raw or {}), acct.data_dir)
        self.webhooks.listeners.append(self._publish)
        self.notifier = Notifier(acct, self.webhooks, self.reader,
                                 wanted=lambda: self.webhooks.settings.configured
                                 or bool(self._subscribers))
        self.server = None

    # -- running work on the accountant's loop ---------------------------------------------
    def on_loop(self, fn: Callable[[], Any], timeout: float = CALL_TIMEOUT) -> Any:
        """Run `fn` on the accountant's loop (between batches) and return its result."""
        acct = self.acct
        fut: concurrent.futures.Future = concurrent.futures.Future()
        once = threading.Lock()

        def run() -> None:
            if not once.acquire(blocking=False):
                return
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

        if getattr(acct, "looping", False):
            acct.calls.put(run)
            end = time.monotonic() + timeout
            while True:
                try:
                    return fut.result(timeout=0.05)
                except concurrent.futures.TimeoutError:
                    pass
                if not acct.looping:
                    break
                if time.monotonic() > end:
                    if once.acquire(blocking=False):     # it never ran: withdraw it
                        raise TimeoutError("the accountant's loop did not answer in time")
                    return fut.result(timeout=timeout)   # it is running: wait for it
        with self._direct:
            run()
        return fut.result(timeout=timeout)

    # -- events ------------------------------------------------------------------------------
    def _publish(self, event: str, payload: dict, account: str | None, msg_id: str) -> None:
        item = (msg_id, event, account or payload.get("account", ""), payload, time.time_ns())
        with self._sub_lock:
            subs = list(self._subscribers)
        for q in subs:
            try:
                q.put_nowait(item)
            except queue.Full:
                log.warning("a Billing.Events subscriber fell behind; event %s dropped", msg_id)

    def subscribe(self) -> queue.Queue:
        q: queue.Queue = queue.Queue(EVENT_QUEUE)
        with self._sub_lock:
            self._subscribers.add(q)
        return q

    def unsubscribe(self, q: queue.Queue) -> None:
        with self._sub_lock:
            self._subscribers.discard(q)

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> BillingServer:
        import grpc

        from proto import pb

        server = grpc.server(concurrent.futures.ThreadPoolExecutor(
            max_workers=8, thread_name_prefix="billing-api"),
            options=[("grpc.so_reuseport", 0)])
        pb.billing_pb2_grpc.add_BillingServicer_to_server(_Servicer(self), server)
        if self.address.startswith("unix:"):
            path = self.address[len("unix:"):]
            private_dir(os.path.dirname(path))
            if _answers(path):
                raise OSError(f"another accountant serves the Billing API on {self.address}")
            try:
                os.unlink(path)    # a socket left by an accountant that died
            except FileNotFoundError:
                pass
        if not server.add_insecure_port(self.address):
            raise OSError(f"cannot listen for the Billing API on {self.address}")
        server.start()
        self.server = server
        self.webhooks.start()
        self.acct.on_snapshot.append(self.notifier.on_snapshot)
        log.info("Billing API on %s", self.address)
        return self

    def stop(self, grace: float = 0.5) -> None:
        if self.notifier.on_snapshot in self.acct.on_snapshot:
            self.acct.on_snapshot.remove(self.notifier.on_snapshot)
        with self._sub_lock:
            subs = list(self._subscribers)
        for q in subs:
            q.put_nowait(None)
        if self.server is not None:
            self.server.stop(grace).wait(grace + 1)
            self.server = None
        if self.address.startswith("unix:"):
            try:
                os.unlink(self.address[len("unix:"):])
            except OSError:
                pass
        self.webhooks.flush(timeout=1.0)
        self.webhooks.stop()
        self.reader.close()


def _answers(path: str) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def start_service(acct, raw: dict | None = None, address: str | None = None) -> BillingServer:
    """Serve Billing for `acct` (and send its notifications) until `stop()`."""
    return BillingServer(acct, raw, address).start()


class BackgroundService:
    """Starts the Billing server on a thread of its own, so that the accountant
    drains the ring at once instead of after gRPC's start-up; `stop()` waits
    for the start and stops what was started."""

    def __init__(self, acct, raw: dict | None = None) -> None:
        self.server: BillingServer | None = None
        self._thread = threading.Thread(target=self._start, args=(acct, raw),
                                        name="billing-api-start", daemon=True)
        self._thread.start()

    def _start(self, acct, raw) -> None:
        try:
            self.server = start_service(acct, raw)
        except Exception as exc:
            log.error("the Billing API is not available: %s", exc)

    def stop(self) -> None:
        self._thread.join(30)
        if self.server is not None:
            self.server.stop()
            self.server = None


class _Servicer:
    """The `baton.v1.Billing` handlers (the accountant side)."""

    def __init__(self, srv: BillingServer) -> None:
        self.srv = srv
        self.acct = srv.acct

    def _on_loop(self, context, fn):
        import grpc

        try:
            return self.srv.on_loop(fn)
        except TimeoutError:
            context.abort(grpc.StatusCode.UNAVAILABLE,
                          "the accountant is busy (a database problem?); try again")

    @staticmethod
    def _bad(context, message: str):
        import grpc

        context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

    def Invoice(self, request, context):
        from engine.accounting.invoices import invoice

        for problem in (check_account(request.account), check_period(request.period)):
            if problem:
                self._bad(context, problem)
        currency = self.acct.book.account(request.account).currency
        doc = self.srv.reader(lambda led: invoice(led, request.account, request.period, currency))
        return invoice_pb(doc)

    def Payouts(self, request, context):
        from engine.accounting.invoices import payouts

        problem = check_period(request.period)
        if problem:
            self._bad(context, problem)
        vendor = request.vendor or None
        doc = self.srv.reader(lambda led: payouts(led, request.period, vendor))
        return payouts_pb(doc)

    def Cost(self, request, context):
        import grpc

        from proto import pb

        sid = request.session_id
        if not sid:
            self._bad(context, "session_id: required")
        acct = self.acct

        def live():
            o = acct.meter.find(sid)
            if o is None:
                return None
            return (o.account, o.module, acct.running_cost(sid))

        found = self._on_loop(context, live)
        if found is not None:
            account, module, micros = found
            currency = acct.book.account(account).currency
            return pb.billing_pb2.SessionCost(session_id=sid, account=account, live=True,
                                              module=module or "",
                                              cost=money_pb(micros, currency))
        rows = self.srv.reader(lambda led: led.transactions(session=sid))
        if not rows:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"session_id: the accountant has not metered session {sid!r} "
                          "(not stamped yet, or unknown)")
        # The payer at the end (a calling card's PIN changes it mid-call): its
        # lines only; what an earlier payer paid is on that account's invoice.
        account = rows[-1]["account"]
        currency = rows[-1]["currency"]
        total = sum(int(r["amount"]) for r in rows
                    if r["account"] == account and r["currency"] == currency)
        return pb.billing_pb2.SessionCost(session_id=sid, account=account, live=False,
                                          cost=money_pb(total, currency))

    def Balance(self, request, context):
        from proto import pb

        problem = check_account(request.account)
        if problem:
            self._bad(context, problem)
        acct = self.acct
        snap = self._on_loop(context, acct.policy_snapshot)
        a = snap["accounts"].get(request.account)
        cur = acct.book.account(request.account).currency
        out = pb.billing_pb2.AccountBalance(account=request.account, period=snap["period"])
        if a is None:
            out.balance.CopyFrom(money_pb(0, cur))
            out.period_charges.CopyFrom(money_pb(0, cur))
            out.live_sessions_cost.CopyFrom(money_pb(0, cur))
            return out
        cur = a["currency"]
        out.balance.CopyFrom(money_pb(a["balance_micro"], cur))
        if a["funds_left_micro"] is not None:
            out.funds_left.CopyFrom(money_pb(a["funds_left_micro"], cur))
        out.out_of_funds = bool(a["out_of_funds"])
        out.period_charges.CopyFrom(money_pb(a["period_charges_micro"], cur))
        out.live_sessions_cost.CopyFrom(money_pb(a["live_sessions_cost_micro"], cur))
        out.banned = bool(a["banned"])
        out.caps_reached.extend(a["caps_reached"])
        return out

    def Events(self, request, context):
        from proto import pb

        q = self.srv.subscribe()
        try:
            while context.is_active():
                try:
                    item = q.get(timeout=0.5)
                except queue.Empty:
                    continue
                if item is None:
                    return
                msg_id, event, account, payload, t = item
                if request.account and account != request.account:
                    continue
                yield pb.billing_pb2.BillingEvent(id=msg_id, type=event, account=account,
                                                  data=pb.to_struct(payload), time_ns=t)
        finally:
            self.srv.unsubscribe(q)


class Notifier:
    """balance.low, cap.reached and invoice.ready from the policy snapshots
    (called on the accountant's loop after each one is written). Each fires
    once per crossing: the outbox remembers what was sent across restarts."""

    def __init__(self, acct, webhooks, reader: _Reader,
                 wanted: Callable[[], bool] = lambda: True) -> None:
        self.acct = acct
        self.webhooks = webhooks
        self.reader = reader
        self.wanted = wanted      # whether anyone listens (a webhook URL, an Events stream)
        self._closed_checked: str | None = None
        self._thresholds: dict[str, int | None] = {}

    def threshold(self, account: str) -> int | None:
        """The account's low-balance threshold in micro-units, or None."""
        if account not in self._thresholds:
            from engine.accounting.money import parse_money

            value = self.webhooks.settings.low_balance_of(account)
            self._thresholds[account] = parse_money(value) if value is not None else None
        return self._thresholds[account]

    def on_snapshot(self, snap: dict) -> None:
        send = self.webhooks.send
        outbox = self.webhooks.outbox
        period = snap["period"]
        for acc_id, a in snap["accounts"].items():
            cur = a["currency"]
            limit = self.threshold(acc_id)
            left = a["funds_left_micro"]
            if limit is not None and left is not None:
                key = f"low:{acc_id}"
                if left < limit:
                    send("balance.low", {
                        "account": acc_id, "currency": cur,
                        "funds_left": a["funds_left"], "funds_left_micro": left,
                        "threshold_micro": limit, "balance_micro": a["balance_micro"],
                        "out_of_funds": a["out_of_funds"]}, account=acc_id, once=key)
                else:
                    outbox.unmark(key)     # topped up: the next fall is news again
            for target in a["caps_reached"]:
                c = a["caps"].get(target, {})
                send("cap.reached", {"account": acc_id, "target": target, "period": period,
                                     "used": c.get("used"), "cap": c.get("cap"),
                                     "at_cap": c.get("at_cap")},
                     account=acc_id, once=f"cap:{acc_id}:{target}:{period}")
        closed = previous_period(period)
        if closed != self._closed_checked:
            self._closed_checked = closed
            if self.wanted():
                self._invoices_ready(closed)

    def _invoices_ready(self, period: str) -> None:
        from engine.accounting.invoices import invoice

        book = self.acct.book
        try:
            docs = self.reader(lambda led: [invoice(led, a, period, book.account(a).currency)
                                            for a in led.accounts_in(period)])
        except Exception:
            log.exception("cannot read the invoices of %s", period)
            self._closed_checked = None
            return
        for doc in docs:
            notify_invoice(self.webhooks, doc)


def notify_invoice(webhooks, doc: dict, *, force: bool = False) -> str:
    """Send invoice.ready for an invoice dict (once per account and period
    unless `force`); the message id, or "" if it was sent before."""
    payload = {"account": doc["account"], "period": doc["period"], "currency": doc["currency"],
               "total": doc["total"], "total_micro": doc["total_micro"],
               "totals": doc["totals"], "lines": len(doc["lines"])}
    return webhooks.send("invoice.ready", payload, account=doc["account"],
                         once=None if force else f"invoice:{doc['account']}:{doc['period']}")


def previous_period(period: str) -> str:
    """The period before `period` ("2026-11" -> "2026-10", "2026-11-01" -> "2026-10-31")."""
    import datetime

    parts = [int(p) for p in period.split("-")]
    if len(parts) == 2:
        y, m = parts
        return f"{y - 1:04d}-12" if m == 1 else f"{y:04d}-{m - 1:02d}"
    d = datetime.date(*parts) - datetime.timedelta(days=1)
    return d.isoformat()


def notify_invoice_now(raw: dict, data_dir: str, doc: dict, timeout: float = 10.0) -> int:
    """`baton bill invoice --notify`: send invoice.ready for `doc` now (again,
    if it was sent before) and wait for its delivery; an exit status. What is
    not delivered within `timeout` stays in the accountant's outbox, which a
    running accountant keeps retrying."""
    import sys

    from engine.common.errors import ConfigError
    from engine.common.webhooks import SyncWebhooks, WebhookSettings

    try:
        settings = WebhookSettings.from_raw(raw)
    except ConfigError as exc:
        print(f"baton bill: {exc}", file=sys.stderr)
        return 2
    if not settings.destination(doc["account"])[0]:
        print("baton bill: --notify needs webhooks.url (or the account's webhook_url)",
              file=sys.stderr)
        return 2
    hooks = SyncWebhooks(settings, data_dir).start()
    try:
        msg_id = notify_invoice(hooks, doc, force=True)
        delivered = hooks.flush(timeout) and not any(m["id"] == msg_id for m in hooks.pending())
    finally:
        hooks.stop()
    if delivered:
        print(f"invoice.ready sent ({msg_id})", file=sys.stderr)
        return 0
    print(f"invoice.ready ({msg_id}) not delivered yet; it stays in the outbox "
          f"(the accountant retries it)", file=sys.stderr)
    return 1
