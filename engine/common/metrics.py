"""Prometheus metrics of the engine and of the accountant (`GET /metrics`).

Nothing here runs per packet or per message. The engine already keeps plain
counters where the work happens (the SIP core's `stats`, `rx_methods` and
`rx_statuses`; the RTP streams' counters in `ext.rtp`; the media clock's
`late_ticks`; the stamper's session and transition counts; the ring's header);
the collectors below read them when Prometheus scrapes, and turn them into
metric families. See docs/observability.md for every name and its meaning.

- Engine: `[engine] metrics_addr = "HOST:PORT"` (or `baton serve --metrics-addr`)
  serves `/metrics` from the engine's own event loop (aiohttp), so the
  collector reads the engine's structures on the thread that changes them.
- Accountant: `[engine] accountant_metrics_addr` (or `baton accountant
  --metrics-addr`) serves `/metrics` from prometheus_client's own HTTP thread;
  that collector only reads integers and one ring header field.
"""
from __future__ import annotations

import collections
import logging

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, GCCollector,
                               PlatformCollector, ProcessCollector, generate_latest)
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                   HistogramMetricFamily)

from engine import __version__

log = logging.getLogger("baton.metrics")

__all__ = ["EngineCollector", "GC_PAUSES", "GcPauses", "AccountantCollector", "LoadCollector", "engine_registry",
           "accountant_registry", "load_registry", "start_metrics", "start_load_metrics",
           "serve_accountant_metrics", "MetricsServer", "parse_addr"]

RTP_CLOCK = 8000.0   # G.711 timestamp units per second (jitter is kept in them)


def parse_addr(addr: str, default_port: int = 9090) -> tuple[str, int]:
    """`HOST:PORT` (or `[v6]:PORT`) as (host, port); ValueError says what is wrong."""
    from engine.common.net import parse_hostport

    return parse_hostport(addr, default_port)


def _counter(name: str, doc: str, value=None, labels=None, rows=()):
    c = CounterMetricFamily(name, doc, labels=labels)
    if labels is None:
        c.add_metric([], value)
    else:
        for lv, v in rows:
            c.add_metric(list(lv), v)
    return c


def _gauge(name: str, doc: str, value=None, labels=None, rows=()):
    g = GaugeMetricFamily(name, doc, labels=labels)
    if labels is None:
        g.add_metric([], value)
    else:
        for lv, v in rows:
            g.add_metric(list(lv), v)
    return g


class GcPauses:
    """How long the garbage collector stops the process, by generation: a histogram fed
    by a `gc.callbacks` hook (two clock reads per collection). A full collection that
    walks many objects stops the event loop, its SIP and its media clock, for as long."""

    BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5)

    def __init__(self) -> None:
        import time

        self._clock = time.perf_counter
        self._started = 0.0
        n = len(self.BUCKETS) + 1
        self.counts = [[0] * n for _ in range(3)]      # per generation, per bucket (+Inf)
        self.sums = [0.0, 0.0, 0.0]
        self.installed = False

    def install(self) -> None:
        import gc

        if not self.installed:
            gc.callbacks.append(self._callback)
            self.installed = True

    def uninstall(self) -> None:
        import gc

        if self.installed:
            gc.callbacks.remove(self._callback)
            self.installed = False

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = self._clock()
            return
        pause = self._clock() - self._started
        gen = info.get("generation", 2)
        if not 0 <= gen <= 2:
            return
        self.sums[gen] += pause
        row = self.counts[gen]
        for i, bound in enumerate(self.BUCKETS):
            if pause <= bound:
                row[i] += 1
                return
        row[-1] += 1

    def family(self):
        h = HistogramMetricFamily("baton_gc_pause_seconds",
                                  "How long each garbage collection stopped the engine, by "
                                  "generation (2: a full collection)", labels=["generation"])
        for gen in range(3):
            acc, buckets = 0, []
            for bound, n in zip((*self.BUCKETS, float("inf")), self.counts[gen]):
                acc += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), acc))
            h.add_metric([str(gen)], buckets, self.sums[gen])
        return h


GC_PAUSES = GcPauses()      # one per process: the hook sees every collection


class EngineCollector:
    """Reads one engine's counters at scrape time. Must run on the engine's loop."""

    def __init__(self, engine) -> None:
        self.engine = engine
        # (level, module) pairs seen before: they read 0 rather than vanish when idle.
        self.seen: set = set()

    def describe(self):
        return []      # no up-front collection at registration time

    def collect(self):
        e = self.engine
        yield from self._info(e)
        yield from self._sessions(e, self.seen)
        yield from self._sip(e.sip)
        if e.media is not None:
            yield from self._media(e.media)
        yield from self._ring(e.stamper)
        if GC_PAUSES.installed:
            yield GC_PAUSES.family()
        if getattr(e, "accountant", None) is not None:
            yield from self._accountant(e.accountant)

    # -- the families -------------------------------------------------------------
    @staticmethod
    def _info(e):
        g = GaugeMetricFamily("baton_engine_info", "The engine's version and node id (always 1)",
                              labels=["version", "node"])
        g.add_metric([__version__, e.cfg.node_id], 1)
        yield g

    @staticmethod
    def _sessions(e, seen: set):
        by = collections.Counter()
        for s in list(e.sessions.values()):
            m = s.module
            by[(m.level, m.code) if m is not None else ("", "")] += 1
        seen.update(by)
        for key in seen:
            by[key] += 0
        yield _gauge("baton_sessions_active",
                     "Calls in progress by the level and module in control",
                     labels=["level", "module"], rows=sorted(by.items()))
        st = e.stamper
        yield _counter("baton_sessions_started", "Sessions started (rate() of it is the CPS)",
                       st.started)
        yield _counter("baton_sessions_ended", "Sessions ended", st.ended)
        yield _counter("baton_transitions", "Changes of control, by the module and level "
                                            "that took control", labels=["module", "level"],
                       rows=sorted((k, v) for k, v in st.transitions.items()))
        yield _counter("baton_policy_denials", "Transitions the policy engine refused, by the "
                                               "module that was refused",
                       labels=["module"], rows=sorted(((k,), v) for k, v in e.denials.items()))
        yield _counter("baton_outbound_denied", "Outbound calls the account's or vendor's "
                                                "outbound permissions refused, by the reason",
                       labels=["account", "reason"],
                       rows=sorted(e.outbound_denials.items()))
        yield _gauge("baton_outbound_calls", "Outbound calls up, by the account",
                     labels=["account"],
                     rows=sorted(((k,), v) for k, v in e.outbound_calls.items()))
        yield _counter("baton_stamps", "Records stamped for the accountant", st.stamps)

    @staticmethod
    def _sip(sip):
        stats = sip.stats
        sent_codes, sent_methods = [], []
        for key, v in list(stats.items()):
            if key.startswith("sent_"):
                what = key[5:]
                (sent_codes if what.isdigit() else sent_methods).append(((what,), v))
        yield _counter("baton_sip_requests_received", "SIP requests received (retransmissions "
                                                      "included), by method",
                       labels=["method"],
                       rows=sorted(((m,), v) for m, v in sip.rx_methods.items()))
        yield _counter("baton_sip_responses_received", "SIP responses received for our "
                                                       "requests, by status code",
                       labels=["code"],
                       rows=sorted(((str(c),), v) for c, v in sip.rx_statuses.items()))
        yield _counter("baton_sip_requests_sent", "SIP requests sent (new transactions), by method",
                       labels=["method"], rows=sorted(sent_methods))
        yield _counter("baton_sip_responses_sent",
                       "SIP responses sent (first sends), by status code",
                       labels=["code"], rows=sorted(sent_codes))
        yield _counter("baton_sip_parse_errors", "SIP messages dropped as unparseable",
                       stats.get("parse_errors", 0))
        yield _counter("baton_sip_internal_errors",
                       "SIP requests that failed inside the engine (answered 500)",
                       stats.get("internal_errors", 0))
        yield _gauge("baton_sip_dialogs", "SIP dialogs held", len(sip.dialogs))
        reg = sip.registrar
        yield _gauge("baton_sip_registrar_bindings", "Registrar bindings held (expired ones "
                                                     "are purged)", reg.count if reg else 0)
        yield _gauge("baton_sip_tcp_connections", "SIP/TCP connections open",
                     sum(len(t.connections) for t in sip.tcp))
        yield _counter("baton_sip_tcp_refused", "SIP/TCP connections refused at a limit "
                                                "(in all or per source)",
                       stats.get("tcp_refused", 0))
        yield _counter("baton_sip_tcp_idle_closed", "SIP/TCP connections closed as idle",
                       stats.get("tcp_idle_closed", 0))
        ov = sip.overload
        yield _counter("baton_sip_overload_refused", "New INVITEs refused with 503 for "
                                                     "overload (retransmissions not counted)",
                       ov.refused)
        yield _counter("baton_sip_overload_refused_requests", "New requests refused with 503 "
                       "for overload, by method: INVITE, MESSAGE outside a dialog "
                       "(retransmissions not counted)", labels=["method"],
                       rows=sorted(((k,), v) for k, v in ov.refused_by.items()))
        yield _counter("baton_sip_overload_absorbed", "Retransmissions of refused requests "
                                                      "answered again without new work",
                       ov.absorbed)
        yield _counter("baton_sip_overload_entered", "Times the engine entered overload, by "
                                                     "the input that crossed its mark",
                       labels=["cause"], rows=sorted(((k,), v) for k, v in ov.entered.items()))
        yield _gauge("baton_sip_overloaded", "1 while new INVITEs and texts are refused for "
                                             "overload",
                     int(ov.active))
        yield _gauge("baton_sip_overload_admit_rate", "New INVITEs per second admitted while "
                                                      "throttled (0 when not throttled)",
                     ov.admit_rate if ov.throttled else 0.0)
        yield _gauge("baton_sip_calls_in_setup", "Calls in setup: INVITEs received, not yet "
                                                 "answered or failed", ov.calls_in_setup)
        yield _gauge("baton_sip_loop_lag_seconds", "Event-loop lag: how late the last "
                                                   "periodic check ran", ov.loop_lag)
        yield _gauge("baton_sip_rx_queue_bytes", "Octets waiting in the SIP/UDP sockets' "
                                                 "kernel receive queues, the last look",
                     ov.rx_queue)
        tl = sip.transactions
        yield _gauge("baton_sip_transactions", "SIP transactions held, by side",
                     labels=["side"], rows=[(("server",), len(tl.server) + len(tl.lingering)),
                                            (("client",), len(tl.client))])

    @staticmethod
    def _media(media):
        r = media.retired
        rx, tx = r["rx_packets"], r["tx_packets"]
        rxb, txb = r["rx_bytes"], r["tx_bytes"]
        lost, expected = r["lost"], r["expected"]
        slips = r["slips"]
        jitter_sum, jitter_max, receiving = 0.0, 0.0, 0
        for s in list(media.streams.values()):
            st = s.stats()
            rx += st["rx_packets"]
            tx += st["tx_packets"]
            rxb += st["rx_bytes"]
            txb += st["tx_bytes"]
            lost += st["lost"]
            expected += st["expected"]
            slips += st.get("underruns", 0) + st.get("trimmed", 0)
            if st["rx_packets"]:
                j = s.jitter / RTP_CLOCK
                receiving += 1
                jitter_sum += j
                if j > jitter_max:
                    jitter_max = j
        yield _counter("baton_rtp_packets", "RTP packets received (in) and sent (out)",
                       labels=["direction"], rows=[(("in",), rx), (("out",), tx)])
        yield _counter("baton_rtp_bytes", "RTP bytes received (in) and sent (out)",
                       labels=["direction"], rows=[(("in",), rxb), (("out",), txb)])
        yield _counter("baton_rtp_lost_packets", "RTP packets the far ends sent that never "
                                                 "arrived (RFC 3550 A.3)", lost)
        yield _counter("baton_rtp_expected_packets", "RTP packets expected from the far ends "
                                                     "(loss ratio = lost / expected)", expected)
        yield _gauge("baton_rtp_jitter_seconds", "Interarrival jitter (RFC 3550 A.8) over the "
                                                 "streams receiving now: mean and max",
                     labels=["stat"], rows=[(("mean",), jitter_sum / receiving if receiving
                                             else 0.0), (("max",), jitter_max)])
        yield _gauge("baton_rtp_streams", "RTP streams open", len(media.streams))
        yield _counter("baton_rtp_streams_closed", "RTP streams closed", r["streams"])
        yield _gauge("baton_media_channels", "Channels on the 20 ms media clock (players, "
                                             "recorders, mixers)", len(media.channels))
        yield _counter("baton_media_late_ticks", "20 ms media ticks that ran more than a frame "
                                                 "late (skipped)", media.late_ticks)
        yield _counter("baton_media_slips", "20 ms frames a channel's clock heard as silence "
                                            "because their packet came after its tick, or "
                                            "dropped with more than two queued", slips)

    @staticmethod
    def _ring(stamper):
        w = stamper.writer
        if w is None:
            return
        try:
            st = w.stats()
            slots = w.slots
        except ValueError:  # the writer was closed: the engine is stopping
            return
        yield _counter("baton_ring_records_written", "Records published to the call-control ring",
                       st["written"])
        yield _counter("baton_ring_spilled", "Records that went to the overflow file because "
                                             "the ring was full", st["spilled"])
        yield _gauge("baton_ring_fill", "Records published and not yet released by the "
                                        "accountant", st["fill"])
        yield _gauge("baton_ring_slots", "Capacity of the ring, in records", slots)
        yield _gauge("baton_ring_overflow_pending_bytes", "Overflow file bytes not yet released",
                     st["overflow_pending"])


    @staticmethod
    def _accountant(sup):
        yield _gauge("baton_accountant_up", "1 while the accountant child runs and holds the "
                                            "ring's accountant lock, else 0", int(sup.up))
        yield _counter("baton_accountant_restarts", "Times `baton serve` restarted a dead "
                                                    "accountant", sup.restarts)
        yield _gauge("baton_accountant_lag_seconds", "Stamp-to-ledger lag: how long the oldest "
                                                     "record not yet committed to the ledger has "
                                                     "been in the ring (0: none)",
                     round(sup.lag_seconds, 3))


def _base_registry() -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=reg)
    PlatformCollector(registry=reg)
    GCCollector(registry=reg)
    return reg


def engine_registry(engine) -> CollectorRegistry:
    """A registry with the engine's collector and the process/platform/GC ones."""
    reg = _base_registry()
    reg.register(EngineCollector(engine))
    return reg


class MetricsServer:
    """A running `/metrics` server of the engine: `url`, `host`, `port`, `stop()`."""

    def __init__(self, runner, host: str, port: int):
        self.runner = runner
        self.host = host
        self.port = port
        h = f"[{host}]" if ":" in host else host
        self.url = f"http://{h}:{port}/metrics"

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_metrics(engine, addr: str) -> MetricsServer:
    """Serve `GET /metrics` (Prometheus text format) for `engine` on `addr` (HOST:PORT,
    port 0 for any free port), on the running loop."""
    return await _serve(engine_registry(engine), addr, "engine.metrics_addr")


async def _serve(registry: CollectorRegistry, addr: str, key: str) -> MetricsServer:
    from aiohttp import web

    host, port = parse_addr(addr)

    async def metrics(_request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def not_found(_request: web.Request) -> web.Response:
        return web.json_response({"error": "not found: metrics are at /metrics"}, status=404)

    app = web.Application(client_max_size=4096)
    app.router.add_get("/metrics", metrics)
    app.router.add_route("*", "/{tail:.*}", not_found)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        err = OSError(exc.errno, exc.strerror)
        err.config_key = f"{key} {addr}"    # what `baton serve` names
        raise err from None
    bound = port
    for s in runner.addresses:
        bound = s[1]
        break
    server = MetricsServer(runner, host, bound)
    log.info("serving metrics at %s", server.url, extra={"url": server.url})
    return server


# -- the load generator (`baton load --metrics-addr`) ---------------------------------

class LoadCollector:
    """Reads a running `LoadGenerator` (engine/load/generator.py) at scrape time, on its
    loop: its tally (kept as calls end, so a scrape costs the same after a million calls)
    and its live figures."""

    def __init__(self, gen) -> None:
        self.gen = gen

    def describe(self):
        return []

    def collect(self):
        g = self.gen
        t = g.tally
        yield _gauge("baton_load_offered_rate", "Calls per second asked for (--rate)",
                     g.opts.rate)
        yield _gauge("baton_load_achieved_rate", "Calls per second placed since the start "
                                                 "(calls started / seconds placing them)",
                     round(g.achieved_rate, 3))
        yield _counter("baton_load_calls_started", "Calls placed (INVITEs sent)", g.started)
        yield _gauge("baton_load_calls_up", "Calls in progress (placed, not yet ended)",
                     len(g.active))
        yield _counter("baton_load_calls_ended", "Calls ended, by final response code (or "
                                                 "the failure when no response came)",
                       labels=["code"], rows=sorted(((c,), n) for c, n in t.codes.items()))
        yield _counter("baton_load_calls_answered", "Calls answered (2xx)", t.answered)
        yield _histogram("baton_load_pdd_seconds", "Post-dial delay: INVITE to 200, of "
                                                   "answered calls", t.pdd)
        yield _histogram("baton_load_mos", "Estimated MOS per call (ITU-T G.107 E-model), "
                                           "of answered calls that received RTP", t.mos)
        yield _counter("baton_load_rtp_packets", "RTP packets sent (out) and received (in) by "
                                                 "ended calls", labels=["direction"],
                       rows=[(("in",), t.rtp_received), (("out",), t.rtp_sent)])
        yield _counter("baton_load_rtp_expected_packets", "RTP packets the far ends sent to "
                                                          "ended calls (RFC 3550 A.3)",
                       t.rtp_expected)
        yield _counter("baton_load_rtp_lost_packets", "RTP packets lost on the way to ended "
                                                      "calls (loss ratio = lost / expected)",
                       t.rtp_lost)
        yield _counter("baton_load_media_late_ticks", "Ticks of the generator's own 20 ms "
                                                      "media clock skipped (it ran late)",
                       g.media.late_ticks if g.media is not None else 0)
        yield _counter("baton_load_media_slips", "20 ms frames ended calls heard as silence "
                                                 "(their packet came after the tick) or "
                                                 "dropped (over two queued)", t.slips)


def _histogram(name: str, doc: str, hist) -> HistogramMetricFamily:
    h = HistogramMetricFamily(name, doc)
    buckets, acc = [], 0
    for bound, n in zip(hist.bounds, hist.counts):
        acc += n
        buckets.append((f"{bound:g}", acc))
    buckets.append(("+Inf", hist.count))
    h.add_metric([], buckets, hist.total)
    return h


def load_registry(gen) -> CollectorRegistry:
    reg = _base_registry()
    reg.register(LoadCollector(gen))
    return reg


async def start_load_metrics(gen, addr: str) -> MetricsServer:
    """Serve `GET /metrics` for a running load generator on `addr` (HOST:PORT)."""
    return await _serve(load_registry(gen), addr, "--metrics-addr")


# -- the accountant -----------------------------------------------------------------

class AccountantCollector:
    """Reads an `Accountant`'s counters at scrape time (from prometheus_client's
    HTTP thread: integers only, and the ring header's fill)."""

    def __init__(self, acct) -> None:
        self.acct = acct

    def describe(self):
        return []

    def collect(self):
        a = self.acct
        yield _counter("baton_accountant_records", "Ring records metered, rated and committed",
                       a.records)
        yield _counter("baton_accountant_posted_lines", "Ledger lines posted", a.posted)
        yield _counter("baton_accountant_batches", "Batches committed to the ledger", a.batches)
        yield _counter("baton_accountant_bad_records", "Ring records skipped as unusable",
                       a.bad_records)
        yield _gauge("baton_accountant_open_sessions", "Sessions the meter has open",
                     len(a.meter.sessions))
        yield _gauge("baton_accountant_lag_seconds",
                     "Stamp to ledger: wall-clock time from the engine stamping the newest "
                     "committed record to its commit", getattr(a, "lag_seconds", 0.0))
        yield _gauge("baton_accountant_last_commit_timestamp_seconds",
                     "Unix time of the last commit (0: none yet)", getattr(a, "last_commit", 0.0))
        backlog = 0
        reader = a.reader
        if reader is not None:
            try:
                backlog = reader.fill
            except ValueError:  # closed while the accountant reopens it
                backlog = 0
        yield _gauge("baton_accountant_backlog_records", "Records stamped into the ring and "
                                                         "not yet committed to the ledger", backlog)


def accountant_registry(acct) -> CollectorRegistry:
    reg = _base_registry()
    reg.register(AccountantCollector(acct))
    return reg


def serve_accountant_metrics(acct, addr: str):
    """Serve the accountant's `/metrics` on `addr` from a daemon thread; returns
    (url, stop) where `stop()` shuts the server down."""
    from prometheus_client import start_http_server

    host, port = parse_addr(addr)
    server, thread = start_http_server(port, host, registry=accountant_registry(acct))
    bound = server.server_address[1]
    h = f"[{host}]" if ":" in host else host
    url = f"http://{h}:{bound}/metrics"
    log.info("serving metrics at %s", url, extra={"url": url})

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(2)

    return url, stop
