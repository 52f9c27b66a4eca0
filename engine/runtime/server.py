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
from engine.modules import dialing
from engine.modules.catalog import builtin_modules
from engine.modules.instructions import shutdown as instructions_shutdown
from engine.sessions.policy import AllowAll, Rules, Snapshot
from engine.sessions.dispatcher import Registry
from engine.sessions.session import Leg, Session
from engine.sip.core import SipCore
from engine.sip.overload import OverloadLimits
from ext.sip_message import valid_text
from engine.sip.registrar import Registrar, RegistrarLimits
from engine.sip.transport import TcpLimits
from engine.sip.uri import parse_uri
from engine.sessions.stamper import Stamper

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
        # account -> outbound calls up; (account, reason) -> refused dials (modules/dialing.py)
        self.outbound_calls, self.outbound_denials = dialing.new_counters()
        self.metrics = None            # the /metrics server (engine/common/metrics.py)
        self.accountant = None         # baton serve's AccountantSupervisor (engine/runtime/supervisor.py)
        from engine.common.webhooks import EngineHooks, WebhookSettings, Webhooks

        self.webhooks = Webhooks(WebhookSettings.from_raw(cfg.raw, cfg.path), cfg.data_dir)
        self.listeners.append(EngineHooks(self, self.webhooks))

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        os.makedirs(self.cfg.data_dir, exist_ok=True)
        _raise_fd_limit()
        self.stamper = Stamper(os.path.join(self.cfg.data_dir, "ring", "ring.dat"), self.cfg.node_id) \
            if _ring_available() else self.stamper
        from engine.media.audio import SpeechCache

        from engine.media.tones import ringback

        self.speech = SpeechCache(os.path.join(self.cfg.data_dir, "tts"))
        self.ringback = ringback()
        from engine.sessions.journal import SessionStore

        self.store = SessionStore(os.path.join(self.cfg.data_dir, "sessions.db"),
                                  self.stamper.retained())
        self.media = MediaEngine(self.loop, self.cfg.rtp_timeout, self.cfg.rtp_hold_timeout)
        self.media.start()
        await self.webhooks.start()
        self.sip_port = await self.sip.listen(self.cfg.sip_host, self.cfg.sip_port,
                                              self.cfg.transports)
        log.info("listening for SIP on %s port %d (%s)", self.cfg.sip_host, self.sip_port,
                 "+".join(t.upper() for t in self.cfg.transports))
        if self.cfg.raw.get("engine", {}).get("http_addr"):
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
        for attr in ("verify_service", "survey_store", "calling_card_lockouts"):  # SQLite files
            svc = getattr(self, attr, None)
            if svc is not None:
                svc.close()
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
        h = msg.headers
        app = self.cfg.apps.get(route.target) if route.kind == "app" else None
        from_uri = valid_text(h["from"][0])
        session = Session(self, route.account, user, from_uri, valid_text(h["to"][0]), app=app)
        session.params["CallerName"] = _display_name(from_uri)
        self.sessions[session.id] = session
        Leg(session, dialog)
        session.start(node)

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

    def session_ended(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
        self.finished.append(session)
        if len(self.finished) > 1000:
            del self.finished[:500]
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
