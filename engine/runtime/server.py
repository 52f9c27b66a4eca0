"""The engine: one uvloop reactor running the SIP core, media, sessions and modules."""
from __future__ import annotations

import asyncio
import collections
import logging
import os

from engine import __version__
from engine.sessions.apps import Node
from engine.config.load import Config
from engine.media.engine import MediaEngine
from engine.media.ports import PortPool
from engine.sessions import dialing
from engine.modules.catalog import builtin_modules
from engine.modules.instructions import shutdown as instructions_shutdown
from engine.sessions.policy import AllowAll, Rules, Snapshot
from engine.sessions.dispatcher import Registry
from engine.sessions.conversations import Messaging
from engine.sessions.session import Leg, Session
from engine.sip.core import SipCore
from engine.sip.overload import OverloadLimits
from ext.sip_message import valid_text
from engine.sip.registrar import Registrar, RegistrarLimits
from engine.sip.transport import TcpLimits
from engine.sip.uri import parse_uri
from engine.sessions.stamper import Stamper
from engine.common.guard import SetupLimiter, private_dir, trusted_source

log = logging.getLogger("baton.engine")

BUILTIN_MODULES = builtin_modules()


class Engine:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.loop: asyncio.AbstractEventLoop | None = None
        self.media_address = cfg.media_address
        self.ports = PortPool(cfg.media_address, cfg.rtp_port_min, cfg.rtp_port_max)
        registrar = None
        if cfg.registrar_mode != "off":
            registrar = Registrar(cfg.registrar_mode, cfg.realm, cfg.users,
                                  limits=RegistrarLimits(**cfg.registrar_limits))
        self.sip = SipCore(self, advertise=cfg.advertise,
                           user_agent=cfg.user_agent or f"Baton/{__version__}",
                           registrar=registrar, tcp_limits=TcpLimits(**cfg.tcp_limits),
                           overload=OverloadLimits(**cfg.overload), udp_rcvbuf=cfg.udp_rcvbuf)
        self.sessions: dict[str, Session] = {}
        self.messaging = Messaging(self)   # text conversations (SIP MESSAGE)
        self.sip_port = 0
        self.grpc_port = 0
        self.registry = Registry(self, BUILTIN_MODULES, cfg.modules)
        self.policy = Snapshot(os.path.join(cfg.data_dir, "policy.json"),
                               Rules(**cfg.policy) if cfg.policy else AllowAll())
        self.media: MediaEngine | None = None
        self.stamper = Stamper(None, cfg.node_id)
        self.speech = None
        self.ringback = None
        self.store = None
        self.finished: list = []       # recently ended sessions (for the API and tests)
        self._route_nodes: dict = {}   # id(route) -> (route, its Node), see node_for
        self.control = None            # the gRPC control server (control/server.py)
        self.http = None               # the HTTP server for RecordingUrl (engine/runtime/http.py)
        self.listeners: list = []      # callables(session, event: str, detail: dict) for Watch
        self.denials = collections.Counter()  # module code -> policy denials (for /metrics)
        # account -> outbound calls up; (account, reason) -> refused dials (sessions/dialing.py)
        self.outbound_calls, self.outbound_denials = dialing.new_counters()
        self.metrics = None            # the /metrics server (engine/common/metrics.py)
        self.accountant = None         # baton serve's AccountantSupervisor (engine/runtime/supervisor.py)
        self.directory = None          # the cluster's session directory (engine/sessions/directory.py)
        from engine.common.webhooks import EngineHooks, WebhookSettings, Webhooks
        self.setup = SetupLimiter(cfg.guard.max_setup_per_source)
        self.in_setup: dict[str, str] = {}  # session id -> source of an INVITE not yet answered

        self.webhooks = Webhooks(WebhookSettings.from_raw(cfg.raw, cfg.path), cfg.data_dir)
        self.listeners.append(EngineHooks(self, self.webhooks))

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        from engine.common.metrics import GC_PAUSES

        GC_PAUSES.install()     # baton_gc_pause_seconds: collections stop the loop
        private_dir(self.cfg.data_dir)
        _raise_fd_limit()
        self.stamper = Stamper(os.path.join(self.cfg.data_dir, "ring", "ring.dat"), self.cfg.node_id) \
            if _ring_available() else self.stamper
        from engine.media.tts import SpeechCache

        from engine.media.tones import ringback

        self.speech = SpeechCache(os.path.join(self.cfg.data_dir, "tts"),
                                  disk_bytes=self.cfg.guard.tts_cache_bytes)
        self.ringback = ringback()
        from engine.sessions.journal import SessionStore

        self.store = SessionStore(os.path.join(self.cfg.data_dir, "sessions.db"),
                                  self.stamper.retained())
        self.messaging.open_store(os.path.join(self.cfg.data_dir, "messages.db"))
        self.media = MediaEngine(self.loop, self.cfg.rtp_timeout, self.cfg.rtp_hold_timeout)
        self.media.start()
        await self.webhooks.start()
        if self.cfg.cluster.reservations:
            self._start_reservations()   # before the first call can ask the policy
        self.sip_port = await self.sip.listen(self.cfg.sip_host, self.cfg.sip_port,
                                              self.cfg.transports)
        log.info("listening for SIP on %s port %d (%s)", self.cfg.sip_host, self.sip_port,
                 "+".join(t.upper() for t in self.cfg.transports))
        if self.cfg.http_addr:
            from engine.runtime.http import start_http

            self.http = await start_http(self)
        if self.cfg.metrics_addr:
            from engine.common.metrics import start_metrics

            self.metrics = await start_metrics(self, self.cfg.metrics_addr)
        if self.cfg.raw.get("engine", {}).get("grpc", True) and self.cfg.grpc_addr:
            try:
                from control.server import start_control
            except ImportError as exc:
                log.warning("gRPC control API not available: %s", exc)
            else:
                self.control = await start_control(self)
        if self.cfg.cluster.redis:
            self._start_directory()
        # Documents' fetches never reach the engine's own listeners (docs/security.md).
        own = self.cfg.guard.own_ports
        own.update(p for p in (self.sip_port, self.grpc_port,
                               getattr(self.http, "port", 0),
                               getattr(self.metrics, "port", 0)) if p)

    def _start_directory(self) -> None:
        from engine.sessions.directory import SessionDirectory

        c = self.cfg.cluster
        grpc = c.grpc_advertise
        if not grpc and self.control is not None:
            from control.server import grpc_target

            grpc = grpc_target(self)     # bound to a wildcard: set cluster.grpc_advertise
        http = self.http.url.removeprefix("http://") if self.http is not None else ""
        self.directory = SessionDirectory(c.redis, c.prefix, self.cfg.node_id, grpc,
                                          self.sessions.keys, ttl=c.directory_ttl, http=http)
        for sid in self.sessions:        # calls that came in while the API was starting
            self.directory.add(sid)
        if self.control is not None:     # vendor processes learn every node of the cluster
            self.directory.on_nodes = self.control.hub.cluster_changed
        self.directory.start()
        log.info("session directory: %s (prefix %r), this node's gRPC %s", c.redis, c.prefix,
                 grpc or "off")

    def _start_reservations(self) -> None:
        from engine.sessions.reservations import Reservations

        c = self.cfg.cluster
        res = self.policy.cluster = Reservations(c.reservations, self.cfg.node_id,
                                                 c.slice_micro(), ttl=c.reservation_ttl)
        self.policy.cap_slice = c.cap_slice

        async def refresh() -> None:
            while True:
                await asyncio.sleep(c.reservation_ttl / 3)
                await res.run(res.refresh, list(self.sessions))

        self._reservations_task = asyncio.ensure_future(refresh())
        log.info("prepaid funds reserved from the cluster's PostgreSQL in slices of %s, "
                 "capped time in slices of %d s", c.slice, c.cap_slice)

    def session_added(self, session: Session) -> None:
        """A session is live on this node: the engine's table and the cluster's directory."""
        self.sessions[session.id] = session
        if self.directory is not None:
            self.directory.add(session.id)

    async def drain_calls(self, timeout: float | None) -> int:
        """Refuse new calls and OPTIONS probes with 503 and wait for the calls in
        progress to end by themselves, at most `timeout` seconds (None: however
        long they last). Returns the number of calls still up."""
        self.sip.draining = True
        log.info("draining: %d calls in progress, new calls refused", len(self.sessions))
        deadline = None if timeout is None else self.loop.time() + timeout
        while self.sessions and (deadline is None or self.loop.time() < deadline):
            await asyncio.sleep(0.1)
        return len(self.sessions)

    async def stop(self, timeout: float = 3.0) -> None:
        """Graceful stop: new INVITEs get 503, calls in progress end with BYE."""
        if self.control is not None:
            await self.control.stop(grace=0.5)
            self.control = None
        await self.sip.drain(timeout)
        for s in list(self.sessions.values()):
            s.end("shutdown")
        await instructions_shutdown(self)
        if self.http is not None:
            await self.http.stop()
            self.http = None
        if self.metrics is not None:
            await self.metrics.stop()
            self.metrics = None
        self.sip.close()
        if self.media is not None:
            self.media.stop()
        self.ports.close()
        self.stamper.close()
        if self.store is not None:
            self.store.close()
        self.messaging.close_store()
        for attr in ("verify_service", "survey_store", "calling_card_lockouts"):  # SQLite files
            svc = getattr(self, attr, None)
            if svc is not None:
                svc.close()
        if self.directory is not None:
            await self.directory.close()
            self.directory = None
        if self.policy.cluster is not None:
            self._reservations_task.cancel()
            # The ended sessions' writes are still queued: they run first.
            await self.loop.run_in_executor(None, self.policy.cluster.close)
        await self.webhooks.stop()

    # -- the SIP core's application -------------------------------------------
    def node_for(self, route) -> Node:
        if route.kind == "app":
            app = self.cfg.apps[route.target]
            return app.nodes[app.start]
        # A number route's node is the same for every call: made once per route object.
        cached = self._route_nodes.get(id(route))
        if cached is not None and cached[0] is route:
            return cached[1]
        params = dict(route.params)
        if route.kind == "endpoint":
            params.setdefault("to", route.target)
        elif route.kind == "instructions":
            params.setdefault("url", route.target)
        node = Node(name=f"number:{route.number}", module=route.module, params=params)
        if len(self._route_nodes) >= 4096:
            self._route_nodes.clear()
        self._route_nodes[id(route)] = (route, node)
        return node

    def on_invite(self, dialog) -> None:
        msg = dialog.invite
        try:
            user = parse_uri(msg.uri).user or ""
        except ValueError:
            dialog.reject(404)
            return
        route = self.cfg.numbers.get(user)
        if route is None:
            dialog.reject(404)
            return
        node = self.node_for(route)
        module = self.registry.resolve(node.module)
        if msg.max_forwards == 0 and getattr(module, "forwards", False):
            dialog.reject(483)  # RFC 3261 16.3 step 2 for what we would forward
            return
        source = dialog.source[0] if dialog.source else ""
        if not trusted_source(self.cfg, source) and not self.setup.enter(source):
            # Calls in setup per source: an unanswered INVITE holds ports and is
            # what a flood is made of.
            dialog.reject(503, why="setup-limit")
            return
        h = msg.headers
        app = self.cfg.apps.get(route.target) if route.kind == "app" else None
        from_uri = valid_text(h["from"][0])
        session = Session(self, route.account, user, from_uri, valid_text(h["to"][0]), app=app)
        session.params["CallerName"] = _display_name(from_uri)
        self.session_added(session)
        if not trusted_source(self.cfg, source):
            self.in_setup[session.id] = source
        Leg(session, dialog)
        session.start(node)

    def on_text(self, msg, st) -> None:
        self.messaging.on_text(msg, st)

    def on_text_in_dialog(self, dialog, msg):
        return self.messaging.on_text_in_dialog(dialog, msg)

    def journal(self, session: Session) -> None:
        if self.store is not None:
            self.store.record(session)

    def notify(self, session: Session, event: str, detail: dict | None = None) -> None:
        """Tell Watch streams and other listeners about a session event."""
        for listener in list(self.listeners):
            try:
                listener(session, event, detail or {})
            except Exception:
                log.exception("session event listener failed")

    def setup_done(self, session_id: str) -> None:
        """The caller's INVITE was answered and acknowledged, or the call ended."""
        source = self.in_setup.pop(session_id, None)
        if source is not None:
            self.setup.leave(source)

    def session_ended(self, session: Session) -> None:
        self.setup_done(session.id)
        if self.sessions.pop(session.id, None) is not None and self.directory is not None:
            self.directory.remove(session.id)
        forget = getattr(self.policy, "ended", None)
        if forget is not None:
            forget(session)
        res = self.policy.cluster
        if res is not None and res.holds(session.id):
            writer = getattr(self.stamper, "writer", None)
            end_seq = writer.next_seq - 1 if writer is not None else None
            res.run(res.ended, session.id, end_seq)   # after its grant: one worker, in order
        if session.kind == "messaging":
            self.messaging.ended(session)
        finished = self.finished
        finished.append(session)
        if len(finished) > 1000:
            for old in finished[:500]:
                old.forget()
            del finished[:500]
        if log.isEnabledFor(logging.DEBUG):
            log.debug("session %s ended: %s", session.id, session.end_reason,
                      extra={"event": "session.ended", "reason": session.end_reason,
                             "account": session.account, "number": session.number,
                             "duration_ms": ((session.ended_mono or session.started_mono)
                                             - session.started_mono) // 1_000_000})

    def transition(self, session_id: str, target: str, params: dict | None = None) -> bool:
        """The asynchronous API transition: move a live session to a module code,
        an instruction URI, an endpoint or a node of its app."""
        session = self.sessions.get(session_id)
        if session is None or session.ended:
            return False
        session.transition(target, "api", params)
        return True

    def find_session(self, sid: str):
        s = self.sessions.get(sid)
        if s is None:
            for f in reversed(self.finished):
                if f.id == sid:
                    return f
        return s


def _display_name(addr: str) -> str:
    addr = addr.strip()
    if addr.startswith('"'):
        end = addr.find('"', 1)
        return addr[1:end] if end > 0 else ""
    lt = addr.find("<")
    return addr[:lt].strip() if lt > 0 else ""


def _ring_available() -> bool:
    try:
        from ext.kernels import ring  # noqa: F401
    except ImportError:
        return False
    return True


def _raise_fd_limit() -> None:
    """Every call holds RTP/RTCP sockets: allow as many descriptors as the system does."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
