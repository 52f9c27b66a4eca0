"""The link to the accountant's Billing service, and `baton sessions cost`.

The accountant serves `baton.v1.Billing` on a unix socket in the data
directory (engine/accounting/service.py). `BillingClient` is the engine's
end: the control API forwards Billing calls and answers `Sessions.Cost`
through it, and it follows `Billing.Events` so that the accountant's
notifications (balance.low, cap.reached, invoice.ready) reach the engine's
listeners (`Sessions.Watch`). Every call fails fast with UNAVAILABLE while
no accountant runs; the event stream reconnects by itself.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

log = logging.getLogger("baton.billing")

__all__ = ["BillingClient", "CHANNEL_OPTIONS", "cost_main"]

# Notice a (re)started accountant within about two seconds.
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200),
                   ("grpc.min_reconnect_backoff_ms", 200),
                   ("grpc.max_reconnect_backoff_ms", 2000)]
CALL_TIMEOUT = 10.0
# Events held for one Billing.Events watcher that reads too slowly.
SUBSCRIBER_QUEUE = 1000


class BillingClient:
    """The engine's client of the accountant's Billing service (on the engine's loop)."""

    def __init__(self, engine, address: str | None = None) -> None:
        from engine.accounting.service import billing_address

        self.engine = engine
        self.address = address or billing_address(engine.cfg.data_dir)
        self._channel = None
        self._stub = None
        self._task: asyncio.Task | None = None
        self.events_seen = 0
        # Billing.Events watchers of the control API share this client's one
        # stream: the accountant serves each stream with a thread of its own.
        self._subscribers: set[asyncio.Queue] = set()
        self.connected = False

    @property
    def stub(self):
        if self._stub is None:
            import grpc

            from proto import pb

            self._channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
            self._stub = pb.billing_pb2_grpc.BillingStub(self._channel)
        return self._stub

    async def call(self, method: str, request, timeout: float = CALL_TIMEOUT):
        """One unary Billing call; raises grpc.aio.AioRpcError as the accountant answered
        (UNAVAILABLE when it is not running)."""
        return await getattr(self.stub, method)(request, timeout=timeout)

    async def running_cost(self, session_id: str):
        """The session's `SessionCost`, or None when the accountant has not metered it."""
        import grpc

        from proto import pb

        try:
            return await self.call("Cost", pb.billing_pb2.SessionCostRequest(session_id=session_id))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    def subscribe(self) -> asyncio.Queue:
        """A queue that gets every accountant event (`BillingEvent`) from now on."""
        q: asyncio.Queue = asyncio.Queue(SUBSCRIBER_QUEUE)
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self._subscribers.discard(q)

    def start(self) -> None:
        """Follow the accountant's events (reconnecting) until `close()`."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        import grpc

        from proto import pb

        from engine.common.webhooks import AccountEvent

        engine = self.engine
        while True:
            try:
                stream = self.stub.Events(pb.billing_pb2.BillingEventsRequest())
                await stream.wait_for_connection()
                self.connected = True
                async for ev in stream:
                    self.events_seen += 1
                    detail = pb.from_struct(ev.data)
                    detail.setdefault("id", ev.id)
                    engine.notify(AccountEvent(ev.account), ev.type, detail)
                    for q in list(self._subscribers):
                        try:
                            q.put_nowait(ev)
                        except asyncio.QueueFull:
                            log.warning("a Billing.Events watcher fell behind; event %s dropped",
                                        ev.id)
            except asyncio.CancelledError:
                self.connected = False
                raise
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    log.info("accountant events: %s", exc.details())
            except Exception:
                log.exception("accountant events stream failed")
            self.connected = False
            await asyncio.sleep(1.0)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None


# -- `baton sessions cost` ------------------------------------------------------------------

def add_cost_parser(ssub) -> None:
    """Add `baton sessions cost SESSION_ID` to the `sessions` subcommands."""
    sc = ssub.add_parser("cost", help="a session's running cost (from the accountant)",
                         description="The running cost of a session, to the last completed "
                                     "billing increment; once it has ended, what it was "
                                     "billed. Asks the accountant of --data-dir, or an "
                                     "engine's control API with --grpc-addr and --token.")
    sc.add_argument("session_id", metavar="SESSION_ID")
    sc.add_argument("--data-dir", default=".baton", metavar="DIR",
                    help="the engine's data directory (default: .baton)")
    sc.add_argument("--grpc-addr", metavar="HOST:PORT",
                    help="ask this engine's control API instead (needs --token)")
    sc.add_argument("--token", help="an account API token (or BATON_TOKEN)")
    sc.add_argument("--format", choices=("table", "json"), default="table")
    sc.set_defaults(func=cost_main)


def cost_main(args) -> int:
    """Print a session's cost; exit 1 if unknown, 2 if nothing answers."""
    import json

    import grpc

    from proto import pb

    from engine.accounting.service import billing_address

    sid = args.session_id
    token = args.token or os.environ.get("BATON_TOKEN")
    try:
        if args.grpc_addr:
            if not token:
                print("baton: --grpc-addr needs --token (or BATON_TOKEN)", file=sys.stderr)
                return 2
            with grpc.insecure_channel(args.grpc_addr) as ch:
                r = pb.sessions_pb2_grpc.SessionsStub(ch).Cost(
                    pb.sessions_pb2.CostRequest(session_id=sid), timeout=CALL_TIMEOUT,
                    metadata=(("authorization", f"Bearer {token}"),))
            doc = {"session_id": r.session_id, "live": r.live, "currency": r.currency,
                   "amount": r.amount_decimal, "amount_micros": r.amount_micros, "account": ""}
        else:
            address = billing_address(args.data_dir)
            with grpc.insecure_channel(address) as ch:
                r = pb.billing_pb2_grpc.BillingStub(ch).Cost(
                    pb.billing_pb2.SessionCostRequest(session_id=sid), timeout=CALL_TIMEOUT)
            doc = {"session_id": r.session_id, "account": r.account, "live": r.live,
                   "module": r.module, "currency": r.cost.currency, "amount": r.cost.amount,
                   "amount_micros": r.cost.micros}
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            print(f"baton: no cost for session {sid!r}: {exc.details()}", file=sys.stderr)
            return 1
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            where = args.grpc_addr or f"the accountant of {os.path.abspath(args.data_dir)}"
            print(f"baton: {where} does not answer (is it running?)", file=sys.stderr)
            return 2
        print(f"baton: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps(doc, indent=2))
        return 0
    state = "live" if doc["live"] else "ended"
    print(f"session {doc['session_id']}  {state}  "
          f"{doc['amount']} {doc['currency']}  ({doc['amount_micros']} micro-units)"
          + (f"  account {doc['account']}" if doc.get("account") else "")
          + (f"  module {doc['module']}" if doc.get("module") else ""))
    return 0
