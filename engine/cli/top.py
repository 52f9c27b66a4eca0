"""`baton top`: a live terminal view of the calls in progress.

Sources (either or both):

- `--engine HOST:PORT --token TOKEN`: the engine's gRPC control API.
  `Sessions.List` gives the account's live calls (account, module, level,
  start) and its count of sessions started (an operator token's: every
  account's); `Sessions.Cost` each call's running cost
  ("-" while the accountant cannot answer: UNAVAILABLE, FAILED_PRECONDITION).
- `--cluster REDIS_URL --token TOKEN`: every node of a cluster (docs/cluster.md),
  found in its session directory (the nodes' own entries, `PREFIX node:ID`, and the
  owners of its live sessions), each asked as `--engine` is; a NODE column says
  which node holds each call, and a node that does not answer is named in a note.
- `--metrics URL`: the engine's Prometheus `/metrics` (engine-wide: calls by
  module and level, sessions started, SIP, RTP, media clock, ring, policy).

The view refreshes every `--interval` seconds (plain ANSI: it clears the
screen when the output is a terminal) until Ctrl-C; `--once` prints one
frame and exits, for scripts and tests. CPS is the change of the sessions
started between two frames, so the first frame shows "-".
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

__all__ = ["add_parser", "main", "Frame", "render", "collect"]

CLEAR = "\x1b[H\x1b[2J"
COST_TIMEOUT = 0.5
COST_ROWS = 100
NO_COST = ("UNAVAILABLE", "FAILED_PRECONDITION", "UNIMPLEMENTED", "DEADLINE_EXCEEDED")


class TopError(Exception):
    """A source could not be read; the message says which and why."""


@dataclass
class Row:
    session_id: str
    number: str
    caller: str
    module: str
    level: str
    node: str
    seconds: float
    cost: str = "-"
    account: str = ""


@dataclass
class Frame:
    """One refresh: what the sources said at `taken` (monotonic seconds)."""

    taken: float
    rows: list = field(default_factory=list)
    live: int | None = None
    started: int | None = None
    metrics: dict | None = None       # metric name -> {labels tuple: value}
    cps: float | None = None
    notes: list = field(default_factory=list)
    nodes: dict | None = None         # a cluster's view: node id -> its live calls


# -- sources -------------------------------------------------------------------------

def _caller(from_uri: str) -> str:
    """The caller's display name or user part, short."""
    text = from_uri.strip()
    if text.startswith('"'):
        end = text.find('"', 1)
        if end > 1:
            return text[1:end]
    lt = text.find("<")
    inner = text[lt + 1:text.find(">", lt)] if lt >= 0 else text
    inner = inner.split(";", 1)[0]
    if ":" in inner:
        inner = inner.split(":", 1)[1]
    return inner.split("@", 1)[0] or inner


async def _cost(stub, sp, sid: str, metadata, state: dict) -> str:
    import grpc

    from engine.accounting.money import format_money

    if state.get("off"):
        return "-"
    try:
        r = await stub.Cost(sp.CostRequest(session_id=sid), metadata=metadata,
                            timeout=COST_TIMEOUT)
    except grpc.aio.AioRpcError as exc:
        if exc.code().name in NO_COST:
            # The accountant is not answering: do not ask again for this frame.
            state["off"] = True
        return "-"
    return format_money(int(r.amount_micros), r.currency or None)


async def from_engine(stub, token: str, limit: int, costs: bool, frame: Frame) -> None:
    """Fill `frame` from the control API (Sessions.List, then Sessions.Cost per row)."""
    import grpc

    from proto import pb

    sp = pb.sessions_pb2
    metadata = (("authorization", f"Bearer {token}"),)
    try:
        r = await stub.List(sp.ListRequest(limit=limit), metadata=metadata, timeout=3)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise TopError(f"the engine refused the token: {exc.details()}") from None
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            raise TopError(f"cannot reach the engine's control API: {exc.details()}") from None
        raise TopError(f"Sessions.List failed: {exc.code().name}: {exc.details()}") from None
    now = r.now_wall_ns
    frame.live = r.live
    frame.started = r.started_total
    for s in r.sessions:
        frame.rows.append(Row(s.session_id, s.number, _caller(s.from_uri), s.module, s.level,
                              s.node, max(0.0, (now - s.started_wall_ns) / 1e9),
                              account=s.account))
    if costs and frame.rows:
        # Only the rows shown, and never more than COST_ROWS: each is one RPC.
        state: dict = {}
        # The first one alone: when the accountant is away, one call says so.
        frame.rows[0].cost = await _cost(stub, sp, frame.rows[0].session_id, metadata, state)
        if not state.get("off"):
            ask = frame.rows[1:COST_ROWS]
            rest = await asyncio.gather(*(_cost(stub, sp, row.session_id, metadata, state)
                                          for row in ask))
            for row, c in zip(ask, rest):
                row.cost = c
        else:
            frame.notes.append("running cost: the accountant is not answering")


class Cluster:
    """The nodes of a cluster as `baton top --cluster` and `baton sessions list --cluster`
    reach them: its session directory in Redis, one gRPC channel per node."""

    def __init__(self, url: str, prefix: str, tls_ca: str | None = None) -> None:
        from engine.sessions.directory import SessionDirectory

        self.url = url
        self.directory = SessionDirectory(url, prefix, "", "", list)
        self.tls_ca = tls_ca
        self.channels: dict = {}

    def stub(self, target: str):
        from proto import pb

        ch = self.channels.get(target)
        if ch is None:
            ch = self.channels[target] = _open_channel(target, self.tls_ca)
        return pb.sessions_pb2_grpc.SessionsStub(ch)

    async def nodes(self) -> dict:
        """node id -> Owner (its gRPC address): every node that announced itself, and
        the owner of every live session (TopError when Redis cannot be read)."""
        from engine.sessions.directory import DirectoryUnavailable

        try:
            nodes = await self.directory.nodes()
            for o in (await self.directory.entries()).values():
                nodes.setdefault(o.node, o)
        except DirectoryUnavailable as exc:
            raise TopError(f"cannot read the session directory at {self.url}: {exc}") from None
        return nodes

    async def fill(self, token: str, limit: int, costs: bool, frame: Frame) -> None:
        """Fill `frame` with every node's calls, each row naming its node."""
        nodes = await self.nodes()

        async def one(node: str, owner) -> Frame:
            part = Frame(taken=frame.taken)
            try:
                await from_engine(self.stub(owner.grpc), token, limit, costs, part)
            except TopError as exc:
                part.live = None
                part.notes = [f"node {node} ({owner.grpc}): {exc}"]
            return part

        ids = sorted(nodes)
        parts = await asyncio.gather(*(one(n, nodes[n]) for n in ids))
        frame.nodes = {}
        frame.live = frame.started = 0
        for node, part in zip(ids, parts):
            frame.notes.extend(part.notes)
            if part.live is None:
                frame.nodes[node] = None
                continue
            frame.nodes[node] = part.live
            frame.live += part.live
            frame.started += part.started or 0
            for row in part.rows:
                row.node = node
            frame.rows.extend(part.rows)
        frame.rows.sort(key=lambda r: (r.node, -r.seconds))
        del frame.rows[limit:]
        if not nodes:
            frame.notes.append(f"no node has announced itself in {self.url}")

    async def close(self) -> None:
        for ch in self.channels.values():
            await ch.close()
        self.channels.clear()
        await self.directory.redis.aclose()


async def from_metrics(http, url: str, frame: Frame) -> None:
    """Fill `frame.metrics` from a Prometheus text exposition at `url`."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    try:
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=3)) as resp:
            if resp.status != 200:
                raise TopError(f"{url}: HTTP {resp.status}")
            text = await resp.text()
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        raise TopError(f"cannot read {url}: {exc or type(exc).__name__}") from None
    out: dict = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    frame.metrics = out


def _m(metrics: dict, name: str, **labels) -> float | None:
    series = metrics.get(name)
    if not series:
        return None
    if not labels:
        return sum(series.values())
    want = set(labels.items())
    return sum(v for k, v in series.items() if want <= set(k))


# -- rendering -----------------------------------------------------------------------

def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _num(v) -> str:
    if v is None:
        return "-"
    return f"{int(v):,}" if float(v).is_integer() else f"{v:,.2f}"


def render(frame: Frame, source: str, max_rows: int | None = None) -> str:
    """The text of one frame (no terminal control codes)."""
    lines = [f"baton top — {source} — {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"]
    m = frame.metrics
    cps = "-" if frame.cps is None else f"{frame.cps:.1f}"
    if frame.live is not None:
        lines.append(f"calls: {frame.live} live   {_num(frame.started)} started   CPS {cps}")
    if frame.nodes is not None:
        lines.append(f"nodes: {len(frame.nodes)}   " + ", ".join(
            f"{n} {'DOWN' if c is None else f'{c} live'}" for n, c in frame.nodes.items()))
    if m is not None:
        live = _m(m, "baton_sessions_active") or 0
        started = _m(m, "baton_sessions_started_total")
        if frame.live is None:
            lines.append(f"calls: {_num(live)} live   {_num(started)} started   CPS {cps}")
        else:
            lines.append(f"engine: {_num(live)} live   {_num(started)} started (all accounts)")
        expected = _m(m, "baton_rtp_expected_packets_total") or 0
        lost = _m(m, "baton_rtp_lost_packets_total") or 0
        loss = f"{100.0 * lost / expected:.2f}%" if expected else "-"
        jitter = _m(m, "baton_rtp_jitter_seconds", stat="max")
        lines.append(
            f"sip: {_num(_m(m, 'baton_sip_requests_received_total'))} requests in, "
            f"{_num(_m(m, 'baton_sip_responses_sent_total'))} responses out, "
            f"{_num(_m(m, 'baton_sip_responses_sent_total', code='503'))} 503   "
            f"rtp: {_num(_m(m, 'baton_rtp_packets_total', direction='in'))} in, "
            f"{_num(_m(m, 'baton_rtp_packets_total', direction='out'))} out, loss {loss}, "
            f"jitter max {'-' if jitter is None else f'{jitter * 1000:.1f} ms'}")
        lines.append(
            f"media: {_num(_m(m, 'baton_media_late_ticks_total') or 0)} late ticks   "
            f"ring: {_num(_m(m, 'baton_ring_fill'))}/{_num(_m(m, 'baton_ring_slots'))} filled, "
            f"{_num(_m(m, 'baton_ring_spilled_total') or 0)} spilled   "
            f"policy: {_num(_m(m, 'baton_policy_denials_total') or 0)} denials")
        up = _m(m, "baton_accountant_up")
        if up is not None:
            lag = _m(m, "baton_accountant_lag_seconds") or 0.0
            lines.append(f"accountant: {'up' if up else 'DOWN'}   lag {lag:.3f} s   "
                         f"{_num(_m(m, 'baton_accountant_restarts_total') or 0)} restarts")
    lines.extend(frame.notes)
    lines.append("")
    if frame.live is not None:
        # ACCOUNT is always there, so the columns stay put as calls come and go
        # (an operator token's view spans every account).
        # A cluster's view names the node of each call.
        node = frame.nodes is not None
        lines.append(f"{'SESSION':<16} " + (f"{'NODE':<10} " if node else "") +
                     f"{'ACCOUNT':<14} {'NUMBER':<10} {'CALLER':<16} "
                     f"{'MODULE':<22} {'LEVEL':<11} {'DURATION':>9} {'COST':>14}")
        rows = frame.rows if max_rows is None else frame.rows[:max_rows]
        for r in rows:
            lines.append(f"{r.session_id:<16} " + (f"{r.node[:10]:<10} " if node else "") +
                         f"{(r.account or '-')[:14]:<14} "
                         f"{r.number[:10]:<10} {r.caller[:16]:<16} {r.module[:22]:<22} "
                         f"{r.level[:11]:<11} {_duration(r.seconds):>9} {r.cost:>14}")
        hidden = (frame.live or 0) - len(rows)
        if hidden > 0:
            lines.append(f"… and {hidden} more")
        if not frame.rows:
            lines.append("(no calls in progress)")
    elif m is not None:
        lines.append(f"{'MODULE':<28} {'LEVEL':<12} {'CALLS':>8}")
        active = sorted(((dict(k).get("module", ""), dict(k).get("level", ""), v)
                         for k, v in m.get("baton_sessions_active", {}).items() if v),
                        key=lambda t: -t[2])
        for module, level, v in active[:max_rows]:
            lines.append(f"{module[:28]:<28} {level[:12]:<12} {int(v):>8}")
        if not active:
            lines.append("(no calls in progress)")
    return "\n".join(lines)


# -- the loop ------------------------------------------------------------------------

async def collect(stub, http, args, prev: Frame | None, rows: int | None = None,
                  cluster: Cluster | None = None) -> Frame:
    """One frame from the configured sources (at most `rows` calls listed), with CPS
    against `prev`."""
    frame = Frame(taken=time.monotonic())
    limit = args.limit if rows is None else min(args.limit, rows)
    if cluster is not None:
        await cluster.fill(args.token, limit, not args.no_cost, frame)
    elif stub is not None:
        await from_engine(stub, args.token, limit, not args.no_cost, frame)
    if args.metrics:
        await from_metrics(http, args.metrics, frame)
    now_started = frame.started
    if now_started is None and frame.metrics is not None:
        now_started = _m(frame.metrics, "baton_sessions_started_total")
    if prev is not None:
        before = prev.started
        if before is None and prev.metrics is not None:
            before = _m(prev.metrics, "baton_sessions_started_total")
        elapsed = frame.taken - prev.taken
        if before is not None and now_started is not None and elapsed > 0:
            frame.cps = max(0.0, (now_started - before) / elapsed)
    return frame


def _open_channel(target: str, tls_ca: str | None):
    import grpc

    if tls_ca:
        with open(tls_ca, "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        return grpc.aio.secure_channel(target, creds)
    return grpc.aio.insecure_channel(target)


def _channel(args):
    return _open_channel(args.engine, args.tls_ca)


async def run(args, out=None) -> int:
    import aiohttp

    out = out or sys.stdout
    tty = out.isatty() and not args.once
    source = " + ".join(x for x in (f"engine {args.engine}" if args.engine else "",
                                    f"cluster {args.cluster} ({args.prefix})"
                                    if args.cluster else "",
                                    args.metrics or "") if x)
    channel = stub = cluster = None
    if args.cluster:
        cluster = Cluster(args.cluster, args.prefix, args.tls_ca)
    elif args.engine:
        from proto import pb

        channel = _channel(args)
        stub = pb.sessions_pb2_grpc.SessionsStub(channel)
    http = aiohttp.ClientSession() if args.metrics else None
    prev = None
    try:
        while True:
            rows = None
            if tty:
                rows = max(1, shutil.get_terminal_size((120, 40)).lines - 10)
            try:
                frame = await collect(stub, http, args, prev, rows, cluster)
            except TopError as exc:
                print(f"baton top: {exc}", file=sys.stderr)
                return 1
            except Exception as exc:       # e.g. the engine is not there
                import grpc

                if isinstance(exc, grpc.aio.AioRpcError):
                    print(f"baton top: cannot reach the engine at {args.engine}: "
                          f"{exc.code().name}: {exc.details()}", file=sys.stderr)
                    return 1
                raise
            text = render(frame, source, rows)
            out.write((CLEAR + text + "\n") if tty else
                      (text + "\n") if args.once else (text + "\n\n"))
            out.flush()
            if args.once:
                return 0
            prev = frame
            await asyncio.sleep(max(0.0, args.interval - (time.monotonic() - frame.taken)))
    finally:
        if http is not None:
            await http.close()
        if channel is not None:
            await channel.close()
        if cluster is not None:
            await cluster.close()


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", metavar="HOST:PORT",
                   help="the engine's gRPC control API (with --token): live calls and cost")
    p.add_argument("--token", default=os.environ.get("BATON_TOKEN"),
                   help="an account API token (default: $BATON_TOKEN); shows that account's "
                        "calls, or an operator token (engine.operator_tokens): every account's")
    p.add_argument("--metrics", metavar="URL",
                   help="the engine's /metrics URL (e.g. http://127.0.0.1:9090/metrics): "
                        "engine-wide counters")
    p.add_argument("--cluster", metavar="REDIS_URL",
                   help="every node of a cluster (with --token), found in its session "
                        "directory (docs/cluster.md), with a NODE column")
    p.add_argument("--prefix", default="baton:",
                   help="with --cluster: the cluster's Redis key prefix (default baton:)")
    p.add_argument("--tls-ca", metavar="PEM", help="CA bundle when the control API uses TLS")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between frames (1)")
    p.add_argument("--limit", type=int, default=1000, help="at most this many calls (1000)")
    p.add_argument("--no-cost", action="store_true", help="do not ask for running costs")
    p.add_argument("--once", action="store_true", help="print one frame and exit")


def add_parser(sub) -> argparse.ArgumentParser:
    """Add `top` to the `baton` command's subparsers."""
    p = sub.add_parser("top", help="live view of calls in progress: module, level, duration, "
                                   "running cost, CPS",
                       description="A live view of the calls in progress (module, level, "
                                   "duration, running cost) and of the engine's counters, "
                                   "refreshed every second; --once prints one frame.")
    _configure(p)
    p.set_defaults(func=main_args)
    return p


def _check(args) -> str | None:
    if not args.engine and not args.metrics and not args.cluster:
        return ("give --engine HOST:PORT --token TOKEN (or --cluster REDIS_URL --token TOKEN), "
                "or --metrics URL, or both")
    if args.engine and args.cluster:
        return "--engine or --cluster, not both"
    if (args.engine or args.cluster) and not args.token:
        return (f"{'--engine' if args.engine else '--cluster'} needs --token (an account API "
                "token), or set BATON_TOKEN")
    if args.cluster and not args.cluster.startswith(("redis://", "rediss://", "unix://")):
        return f"--cluster: {args.cluster!r} is not a Redis URL (redis://HOST:PORT/DB)"
    if args.metrics and not args.metrics.startswith(("http://", "https://")):
        return f"--metrics: {args.metrics!r} is not an http:// URL"
    if not 0.1 <= args.interval <= 3600:
        return "--interval: seconds between 0.1 and 3600"
    if not 1 <= args.limit <= 10_000:
        return "--limit: between 1 and 10000"
    return None


def main_args(args) -> int:
    problem = _check(args)
    if problem:
        print(f"baton top: {problem}", file=sys.stderr)
        return 2
    from engine.cli.common import run_loop

    try:
        return run_loop(run(args))
    except KeyboardInterrupt:
        return 0


def main(argv=None) -> int:
    """`baton top ...` on its own (see `baton top --help`)."""
    p = argparse.ArgumentParser(prog="baton top", description="Live view of calls in progress")
    _configure(p)
    return main_args(p.parse_args(argv))
