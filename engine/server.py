"""The engine: one uvloop reactor running the SIP core, media and modules."""
from __future__ import annotations

import asyncio
import logging
import os

from . import __version__
from .config import Config
from .media.ports import PortPool
from .media.engine import MediaEngine
from .modules.echo import EchoModule
from .modules.hold import HoldModule
from .session import Leg, Session
from .sip.core import SipCore
from .sip.registrar import Registrar
from .sip.uri import parse_uri

log = logging.getLogger("baton.engine")

BUILTIN_MODULES = {m.code: m for m in (HoldModule, EchoModule)}


class Engine:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.loop: asyncio.AbstractEventLoop | None = None
        self.media_address = cfg.media_address
        self.ports = PortPool(cfg.media_address, cfg.rtp_port_min, cfg.rtp_port_max)
        registrar = None
        if cfg.registrar_mode != "off":
            registrar = Registrar(cfg.registrar_mode, cfg.realm, cfg.users)
        self.sip = SipCore(self, advertise=cfg.advertise,
                           user_agent=cfg.user_agent or f"Baton/{__version__}",
                           registrar=registrar)
        self.sessions: dict[str, Session] = {}
        self.sip_port = 0
        self._modules = {}
        self.media: MediaEngine | None = None

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        os.makedirs(self.cfg.data_dir, exist_ok=True)
        _raise_fd_limit()
        self.media = MediaEngine(self.loop, self.cfg.rtp_timeout, self.cfg.rtp_hold_timeout)
        self.media.start()
        self.sip_port = await self.sip.listen(self.cfg.sip_host, self.cfg.sip_port,
                                              self.cfg.transports)
        log.info("listening for SIP on %s port %d (%s)", self.cfg.sip_host, self.sip_port,
                 "+".join(t.upper() for t in self.cfg.transports))

    async def stop(self, timeout: float = 3.0) -> None:
        """Graceful stop: new INVITEs get 503, calls in progress end with BYE."""
        await self.sip.drain(timeout)
        for s in list(self.sessions.values()):
            s.end("shutdown")
        self.sip.close()
        if self.media is not None:
            self.media.stop()
        self.ports.close()

    def module_for(self, route):
        key = (route.module, tuple(sorted(route.params.items())))
        m = self._modules.get(key)
        if m is None:
            m = BUILTIN_MODULES[route.module](self, route.params)
            self._modules[key] = m
        return m

    # -- the SIP core's application -------------------------------------------
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
        module = self.module_for(route)
        if msg.max_forwards == 0 and getattr(module, "forwards", False):
            dialog.reject(483)  # RFC 3261 16.3 step 2 for what we would forward
            return
        h = msg.headers
        session = Session(self, route.account, user, h["from"][0], h["to"][0])
        self.sessions[session.id] = session
        leg = Leg(session, dialog)
        session.give_control(module, module.level, "initial")
        module.take(session, leg)

    def session_ended(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
        log.debug("session %s ended: %s", session.id, session.end_reason)


def _raise_fd_limit() -> None:
    """Every call holds RTP/RTCP sockets: allow as many descriptors as the system does."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
