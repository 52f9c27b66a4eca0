"""Overload control: refuse new calls early and cheaply when the engine is past capacity.

Past capacity every call costs more than it brings: a caller whose INVITE waits too long
retransmits it, and the engine spends its time on calls that will fail anyway (SIP
congestion collapse, RFC 6357). So the engine watches what it can measure, with
hysteresis (it enters overload above a high-water mark and leaves only once every input is
below its low-water mark):

- event-loop lag: how late a periodic timer fires, sustained over a few looks in a row;
- calls in setup: initial INVITEs received and not yet answered or failed;
- receive backlog: octets waiting in the SIP/UDP sockets' kernel receive queues (Linux
  SO_MEMINFO): the event loop interleaves its timers with reading, so a queue seconds deep
  shows no loop lag, yet every answer it holds comes late and makes callers retransmit.

While overloaded, a new out-of-dialog INVITE, and a MESSAGE outside any dialog (RFC 3428
pager mode: each one is new work, a conversation's module run, a text recorded), is
answered `503 Service Unavailable` with `Retry-After` (RFC 3261 21.5.4) before any
transaction, dialog or session exists, and the refusal is remembered for a while (by
transaction key) so that the sender's retransmissions get the same 503 again without new
work. Both draw on the one admission rate while throttled. Every other request (ACK, BYE,
CANCEL, re-INVITE and all in-dialog requests, a MESSAGE inside a call's dialog, OPTIONS,
REGISTER) goes its ordinary way.

RFC 7339 (loss-based overload control): a peer that puts `oc` in its Via says it can throttle
itself. While the engine is overloaded, every response to such a request carries in its top
Via `oc=<percent>;oc-algo="loss";oc-validity=<ms>;oc-seq=<seconds>`: the share of new
requests the peer should not send for the next `oc-validity` milliseconds. Once overload is
over, responses say `oc=0;oc-validity=0` for a while (an oc-validity of 0 ends the control).
A peer whose `oc-algo` list does not name "loss" gets nothing (the only algorithm here).
"""
from __future__ import annotations

import asyncio
import collections
import socket
import struct
import time
from dataclasses import dataclass

LAG_INTERVAL = 0.05    # seconds between two looks at the event loop's lag
SO_MEMINFO = getattr(socket, "SO_MEMINFO", 55)   # Linux 4.6: struct sk_meminfo, u32[9]
MIN_RATE = 5.0         # calls/s admitted at least while throttled
RATE_DOWN = 0.85       # the admitted rate's cut per look while an input is above its low mark
RATE_UP = 1.1          # its rise per look while every input is below: back to a rate 10x
                       # higher within 1.2 s once a stall has passed
GROWTH = 0.1           # a queue grew when it gained this share of its mark in one look
LAG_WINDOW = 4         # the lag counted is the least of this many looks in a row: sustained
                       # lateness, not one slow callback (a first import, a GC pause)
OC_VALIDITY_MS = 500   # RFC 7339 oc-validity: how long a peer applies a reduction (10 looks)
OC_LINGER = 5.0        # seconds after overload during which oc peers are told it is over


@dataclass
class OverloadLimits:
    """The knobs (`[overload]` in the config, docs/operators-guide.md)."""

    enabled: bool = True
    max_calls_in_setup: int = 1000     # enter overload at this many calls in setup ...
    max_loop_lag_ms: float = 200.0     # ... or at this much event-loop lag ...
    max_rx_queue_kb: int = 1024        # ... or this many KiB queued in the SIP/UDP sockets
    low_water: float = 0.5             # leave once every input is below this share of its mark
    retry_after: int = 2               # seconds, in the 503's Retry-After
    remember: float = 32.0             # seconds a refusal is remembered (64*T1, timer H)
    max_remembered: int = 65536        # refusals remembered at most


class Overload:
    """The admission check of new calls and what it measures.

    Two states, either of which makes `active` true:
    - setup full: calls in setup reached their mark; every new INVITE is refused until they
      are down to the low-water share (a hard bound on what setup may hold);
    - throttled: loop lag or the receive queue reached its mark; new INVITEs are admitted
      at `admit_rate` calls/s (a token bucket) and the rest refused. The rate starts a little
      below what the engine was admitting and is adjusted every look: cut while the queue
      above its low-water mark still grows (or the lag is past its mark), held while such a
      queue shrinks, raised while every input is below its low mark; the engine leaves the
      state once all are below and a whole look refused nothing.
    Refusing every INVITE while the queue drains would swing between taking too much and
    taking nothing; admitting at the rate the engine keeps up with holds goodput near its best.
    """

    __slots__ = ("limits", "active", "setup_full", "throttled", "admit_rate", "calls_in_setup",
                 "loop_lag", "rx_queue", "sockets", "refused", "refused_by", "absorbed", "entered",
                 "refusals", "_handle", "_expected", "_loop", "_lags", "_tokens", "_last",
                 "_admitted", "_rate", "_refused_tick", "_prev_queue", "oc_reduction",
                 "oc_seq", "oc_until", "_offered")

    def __init__(self, limits: OverloadLimits | None = None):
        self.limits = limits or OverloadLimits()
        self.active = False          # refusing some or all new INVITEs now
        self.setup_full = False
        self.throttled = False
        self.admit_rate = 0.0        # calls/s admitted while throttled
        self.calls_in_setup = 0
        self.loop_lag = 0.0          # seconds, the last measurement
        self.rx_queue = 0            # octets in the receive queues, the last look
        self.sockets: list = []      # the SIP/UDP sockets whose queues are looked at
        self.refused = 0             # INVITEs refused (retransmissions not counted)
        self.refused_by = collections.Counter()   # requests refused, by method (INVITE, MESSAGE)
        self.absorbed = 0            # retransmissions of refused INVITEs answered from memory
        # times the engine entered overload, by the input that crossed its mark
        self.entered = collections.Counter()
        self._lags = collections.deque([0.0] * LAG_WINDOW, LAG_WINDOW)
        # transaction key -> (expiry, the 503's octets); insertion order is expiry order
        self.refusals: collections.OrderedDict = collections.OrderedDict()
        self._handle = None
        self._expected = 0.0
        self._loop = None
        self._tokens = 0.0
        self._last = 0.0
        self._admitted = 0           # INVITEs admitted since the last look
        self._rate = 0.0             # INVITEs admitted per second, smoothed
        self._refused_tick = 0       # INVITEs refused since the last look
        self._prev_queue = 0
        # RFC 7339: the loss percentage asked of oc peers, its oc-seq, and until when (monotonic)
        # responses carry oc parameters at all (overload, then OC_LINGER after it)
        self.oc_reduction = 0
        self.oc_seq = ""
        self.oc_until = 0.0
        self._offered = 0.0          # new INVITEs per second (admitted + refused), smoothed

    # -- measuring ---------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._handle is not None or not self.limits.enabled:
            return
        self._loop = loop
        self._expected = loop.time() + LAG_INTERVAL
        self._handle = loop.call_at(self._expected, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        loop = self._loop
        now = loop.time()
        self._lags.append(max(0.0, now - self._expected))
        self.loop_lag = min(self._lags)
        self.rx_queue = self._queued()
        self._rate += 0.2 * (self._admitted / LAG_INTERVAL - self._rate)
        self._offered += 0.2 * ((self._admitted + self._refused_tick) / LAG_INTERVAL
                                - self._offered)
        self._throttle()
        self._oc_look()
        self._admitted = self._refused_tick = 0
        refusals = self.refusals
        mono = time.monotonic()
        # Forget expired refusals, so the look at each INVITE stops once overload is over.
        while refusals and next(iter(refusals.values()))[0] < mono:
            refusals.popitem(last=False)
        self._expected = now + LAG_INTERVAL
        self._handle = loop.call_at(self._expected, self._tick)

    def _queued(self) -> int:
        total = 0
        for sock in self.sockets:
            try:
                # sk_meminfo[0]: SK_MEMINFO_RMEM_ALLOC, what the receive queue holds
                total += struct.unpack_from("I", sock.getsockopt(socket.SOL_SOCKET,
                                                                 SO_MEMINFO, 36))[0]
            except OSError:
                pass  # closed, or a kernel without SO_MEMINFO: the other inputs decide
        return total

    def _throttle(self) -> None:
        """Enter, adjust or leave the throttled state from loop lag and the receive queue."""
        lim = self.limits
        lag_ms = self.loop_lag * 1000.0
        queue = self.rx_queue
        if not self.throttled:
            if lag_ms >= lim.max_loop_lag_ms:
                cause = "loop_lag"
            elif min(queue, self._prev_queue) >= lim.max_rx_queue_kb * 1024:
                cause = "rx_queue"   # two looks in a row: a backlog, not one burst
            else:
                self._prev_queue = queue
                return
            if not lim.enabled:
                return
            self.entered[cause] += 1
            self.throttled = True
            self.admit_rate = max(MIN_RATE, 0.9 * self._rate)
            self._tokens = 0.0
            self._last = time.monotonic()
        else:
            low = lim.low_water
            calm = lag_ms <= lim.max_loop_lag_ms * low and queue <= lim.max_rx_queue_kb * 1024 * low
            if calm and self._refused_tick == 0:
                self.throttled = False
            elif calm:
                self.admit_rate *= RATE_UP
            elif queue - self._prev_queue > lim.max_rx_queue_kb * 1024 * GROWTH \
                    or lag_ms >= lim.max_loop_lag_ms:
                # Still falling behind: cut. A queue above its low mark that shrinks (or
                # only wobbles) is being worked off at this rate: hold it.
                self.admit_rate = max(MIN_RATE, self.admit_rate * RATE_DOWN)
        self._prev_queue = queue
        self.active = self.setup_full or self.throttled

    def _oc_look(self) -> None:
        """RFC 7339 loss algorithm: the share of new requests the engine refuses now is
        what oc peers are asked to hold back themselves."""
        if self.setup_full:
            reduction = 100
        elif self.throttled:
            offered = max(self._offered, self.admit_rate, 1e-9)
            reduction = min(100, max(0, round(100.0 * (1.0 - self.admit_rate / offered))))
        else:
            reduction = 0
        if self.active:
            self.oc_until = time.monotonic() + OC_LINGER
        if reduction != self.oc_reduction or not self.oc_seq:
            self.oc_reduction = reduction
            # oc-seq only grows (RFC 7339): a peer keeps the newest value it saw
            self.oc_seq = _oc_seq(self.oc_seq)

    def via_params(self, msg) -> str:
        """The RFC 7339 parameters for the top Via of a response to `msg`, or "" (the peer
        did not offer `oc`, or the engine is not and was not lately overloaded)."""
        if not self.oc_until or time.monotonic() > self.oc_until:
            return ""
        vias = msg.headers.get("via")
        if not vias:
            return ""
        offered = False
        for param in vias[0].split(";")[1:]:
            name, _, value = param.partition("=")
            name = name.strip().lower()
            if name == "oc":
                offered = True
            elif name == "oc-algo" and "loss" not in value.strip().strip('"').lower().split(","):
                return ""
        if not offered:
            return ""
        if self.active:
            return (f';oc={self.oc_reduction};oc-algo="loss";oc-validity={OC_VALIDITY_MS}'
                    f";oc-seq={self.oc_seq}")
        return f';oc=0;oc-algo="loss";oc-validity=0;oc-seq={self.oc_seq}'

    def setup_started(self) -> None:
        self.calls_in_setup += 1
        self._admitted += 1
        if self.calls_in_setup >= self.limits.max_calls_in_setup and not self.setup_full \
                and self.limits.enabled:
            self.setup_full = self.active = True
            self.entered["calls_in_setup"] += 1
            self._oc_look()

    def setup_ended(self) -> None:
        self.calls_in_setup -= 1
        if self.setup_full and \
                self.calls_in_setup <= self.limits.max_calls_in_setup * self.limits.low_water:
            self.setup_full = False
            self.active = self.throttled
            self._oc_look()

    def admit(self) -> bool:
        """While active: may this new INVITE (or out-of-dialog MESSAGE) go on? (False:
        refuse it.)"""
        if self.setup_full:
            self._refused_tick += 1
            return False
        if not self.throttled:
            return True
        now = time.monotonic()
        rate = self.admit_rate
        # A bucket of a tenth of a second's worth: admitted calls come evenly, not in bursts.
        self._tokens = min(rate * 0.1 + 1.0, self._tokens + (now - self._last) * rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        self._refused_tick += 1
        return False

    # -- refusing ----------------------------------------------------------------------
    def remembered(self, key: str):
        """The 503 already sent for this transaction key, or None."""
        entry = self.refusals.get(key)
        if entry is None:
            return None
        if entry[0] < time.monotonic():
            del self.refusals[key]
            return None
        self.absorbed += 1
        return entry[1]

    def admitted(self) -> None:
        """A new request other than an INVITE (a MESSAGE) was taken: it counts in the
        admitted rate the throttle starts from, as a call's setup does."""
        self._admitted += 1

    def remember(self, key: str, data: bytes, method: str = "INVITE") -> None:
        self.refused_by[method] += 1
        if method == "INVITE":
            self.refused += 1
        refusals = self.refusals
        now = time.monotonic()
        # Forget what has expired (oldest first) and keep the table bounded.
        while refusals:
            first = next(iter(refusals.values()))
            if first[0] >= now and len(refusals) < self.limits.max_remembered:
                break
            refusals.popitem(last=False)
        refusals[key] = (now + self.limits.remember, data)


def _oc_seq(last: str) -> str:
    """A new RFC 7339 oc-seq (1*12DIGIT "." 1*5DIGIT): wall-clock seconds, above `last`."""
    seq = round(time.time(), 3)
    if last and seq <= float(last):
        seq = round(float(last) + 0.001, 3)
    return f"{seq:.3f}"
