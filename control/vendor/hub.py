"""`ControlHub`: every vendor module code of the engine, its processes,
conferences, resumable state and the audio caches the vendors share."""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Callable

from engine.media.commands.urlaudio import PcmCache

from control.vendor.commands import VendorModule
from control.vendor.offers import FAILED_PRECONDITION, CommandError, VendorProcess, _event, mh

log = logging.getLogger("baton.control.vendor")


class ControlHub:
    """Every vendor module code of the engine, conferences, and shared caches."""

    def __init__(self, engine, authority):
        self.engine = engine
        self.authority = authority
        self.modules: dict[str, VendorModule] = {}
        self.processes: dict[str, VendorProcess] = {}
        self.conferences: dict[tuple, list] = {}      # (account, name) -> [Conference, count]
        self.resume: dict[str, tuple] = {}            # session id -> (code, process id, dict)
        self._offer_ids = itertools.count(1)
        self._prefix = os.urandom(2).hex()
        self._pcm = PcmCache()      # WAV files played by path
        self.stopping = False
        # A benchmark hook: trace(what, session_id, command_id, monotonic_ns) when media starts.
        self.trace: Callable[[str, str, str, int], None] | None = None

    def new_offer_id(self) -> str:
        return f"O{self._prefix}{next(self._offer_ids):x}"

    def module_for(self, code: str) -> VendorModule:
        m = self.modules.get(code)
        if m is None:
            entry = self.engine.cfg.modules.get(code, {})
            m = VendorModule(self, code, entry.get("level", "service"))
            self.modules[code] = m
        return m

    def attach(self, proc: VendorProcess) -> VendorModule:
        m = self.module_for(proc.code)
        proc.module = m
        m.processes.append(proc)
        self.processes[proc.id] = proc
        self.engine.registry.vendors[proc.code] = m
        log.info("vendor %s attached %s for %s (%d process(es))", proc.vendor, proc.label(),
                 proc.code, len(m.processes))
        return m

    def detach(self, proc: VendorProcess, why: str = "stream-lost") -> None:
        if proc.closed:
            return
        proc.closed = True
        self.processes.pop(proc.id, None)
        m = proc.module
        if m is None:
            return
        m.stream_lost(proc)
        if not m.processes and self.engine.registry.vendors.get(proc.code) is m:
            # Nobody serves the code now: new sessions follow their fallback outlet.
            del self.engine.registry.vendors[proc.code]
        log.info("vendor process %s of %s detached (%s)", proc.label(), proc.code, why)

    # -- the cluster's nodes (docs/cluster.md, Vendors) ----------------------------------
    async def cluster_nodes(self) -> list:
        """The cluster's nodes for a `Registered`: read afresh from the session directory
        (the last list known when Redis does not answer); [] when the node stands alone."""
        from engine.sessions.directory import DirectoryUnavailable

        directory = self.engine.directory
        if directory is None:
            return []
        if directory.down:                # Redis is away: do not make the vendor wait
            return _nodes_pb(directory.known_nodes)
        try:
            nodes = await asyncio.wait_for(directory.cluster_nodes(), 2.0)
        except (DirectoryUnavailable, asyncio.TimeoutError):
            nodes = directory.known_nodes
        return _nodes_pb(nodes)

    def cluster_changed(self, nodes: dict[str, str]) -> None:
        """A node joined or left: every attached process hears the whole list again."""
        msg = mh.EngineMessage(cluster_nodes=mh.ClusterNodes(nodes=_nodes_pb(nodes)))
        for proc in list(self.processes.values()):
            proc.send(msg)

    def cost_warning(self, session_id: str, cost_micros: int, currency: str,
                     threshold_micros: int) -> bool:
        """Tell the vendor process holding `session_id` that its running cost crossed
        `threshold` (the accountant's hook); amounts in integer micro-units, never
        floats. False when no vendor process holds it."""
        from engine.accounting.service import money_pb

        for micros in (cost_micros, threshold_micros):
            if not isinstance(micros, int) or isinstance(micros, bool):
                raise TypeError(f"cost_warning: amounts are int micro-units, not "
                                f"{type(micros).__name__}")
        for proc in list(self.processes.values()):
            ctl = proc.held.get(session_id)
            if ctl is not None and ctl.active:
                proc.send(_event(session_id, ctl.state.offer_id, cost_warning=mh.CostWarning(
                    currency=currency, cost=money_pb(cost_micros, currency),
                    threshold=money_pb(threshold_micros, currency))))
                return True
        return False

    def remember_resume(self, sid: str, code: str, proc_id: str, state: dict) -> None:
        if len(self.resume) > 1000:
            live = self.engine.sessions
            for k in [k for k in self.resume if k not in live]:
                del self.resume[k]
        self.resume[sid] = (code, proc_id, state or None)

    # -- cached audio ---------------------------------------------------------------
    def pcm_get(self, key):
        return self._pcm.get(key)

    def pcm_put(self, key, pcm) -> None:
        self._pcm.put(key, pcm)

    def url_audio(self):
        """The engine's one URL audio fetcher and cache (engine/media/commands/urlaudio.py),
        held by the instructions module's HTTP client, so its checks apply to vendors too."""
        from engine.modules.instructions import shared_for

        return shared_for(self.engine).fetcher.audio

    # -- conferences ----------------------------------------------------------------
    def join_conference(self, sid: str, ch, key: tuple, muted: bool, listen_only: bool) -> int:
        from ext.kernels import rtp
        Conference = rtp.Conference

        entry = self.conferences.get(key)
        if entry is None:
            entry = self.conferences[key] = [Conference(256), 0]
        conf = entry[0]
        try:
            slot = conf.add(sid, "pcm", muted, listen_only)
        except ValueError as exc:
            if entry[1] == 0:
                del self.conferences[key]
            raise CommandError(FAILED_PRECONDITION, f"join_conference: {exc}") from None
        entry[1] += 1
        self.engine.media.clock.join(ch, conf, slot)
        return entry[1]

    def leave_conference(self, sid: str, ch, key: tuple) -> None:
        entry = self.conferences.get(key)
        if entry is None:
            return
        conf = entry[0]
        if ch is not None and ch.conference is conf:
            self.engine.media.clock.leave(ch)
        if sid in conf:
            conf.remove(sid)
            entry[1] -= 1
        if entry[1] <= 0:
            del self.conferences[key]


def _nodes_pb(nodes: dict[str, str]) -> list:
    return [mh.ClusterNode(node_id=n, grpc_addr=addr) for n, addr in sorted(nodes.items())]
