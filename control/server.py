"""The gRPC control server: ModuleHost, Sessions, Billing, the services, Messages,
health checking and reflection.

It runs on the engine's own event loop (grpc.aio), so a vendor's command
reaches the session and its media channel without crossing threads. The
engine calls `start_control(engine)` once listening for SIP and
`await control.stop(grace)` when stopping.

Listening: `[engine] grpc_addr` (port 0 picks a free port, stored in
`engine.grpc_port`); TLS when `grpc_tls_cert` and `grpc_tls_key` are set,
mutual TLS when `grpc_tls_client_ca` is set too.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator

# The engine forks espeak-ng and SIPp-like helpers; none of them uses gRPC, so
# gRPC's fork handlers (and their log line on every fork) are not needed.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import grpc  # noqa: E402
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha import reflection  # noqa: E402

from engine import __version__  # noqa: E402

from proto import pb  # noqa: E402
from control.auth import AuthError, Authority, metadata_value, server_credentials  # noqa: E402
from control.metering import ApiMeter, metering_interceptor  # noqa: E402
from control.billing import BillingService  # noqa: E402
from control.sessions_api import SessionsService  # noqa: E402
from control.call_center_api import CallCenterService  # noqa: E402
from control.services_api import SurveyService, VerifyService  # noqa: E402
from control.messages_api import MessagesService  # noqa: E402
from control.vendor import ControlHub, VendorProcess  # noqa: E402

log = logging.getLogger("baton.control")

mh = pb.module_host_pb2

REGISTER_TIMEOUT = 10.0
SERVER_OPTIONS = [
    # A vendor process that vanishes without closing its connection (a dead
    # host, a cut network) is noticed within about two seconds.
    ("grpc.keepalive_time_ms", 1000),
    ("grpc.keepalive_timeout_ms", 1000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 500),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 8 << 20),
]


class ModuleHostService(pb.module_host_pb2_grpc.ModuleHostServicer):
    """`baton.v1.ModuleHost`: one Attach stream per vendor process."""

    def __init__(self, hub: ControlHub):
        self.hub = hub

    async def Attach(self, request_iterator, context) -> AsyncIterator[mh.EngineMessage]:
        hub = self.hub
        md = context.invocation_metadata()
        md_code = metadata_value(md, "x-baton-module") or ""
        md_secret = metadata_value(md, "x-baton-secret") or ""
        md_vendor = metadata_value(md, "x-baton-vendor") or ""
        if md_code or md_secret:
            # Credentials in metadata are checked before anything is read.
            try:
                hub.authority.vendor_for(md_code, md_secret, md_vendor)
            except AuthError as exc:
                await context.abort(exc.code, exc.message)
        it = request_iterator.__aiter__()
        try:
            first = await asyncio.wait_for(it.__anext__(), REGISTER_TIMEOUT)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"no Register message within {REGISTER_TIMEOUT:g} s")
        if first.WhichOneof("kind") != "register":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "register: the first message of Attach must be a Register")
        reg = first.register
        code = reg.module_code or md_code
        try:
            vendor = hub.authority.vendor_for(code, reg.secret or md_secret,
                                              reg.vendor or md_vendor)
        except AuthError as exc:
            await context.abort(exc.code, exc.message)
        proc = VendorProcess(hub, code, vendor.id, reg.instance, reg.max_sessions,
                             vendor.offer_timeout, context.peer())
        nodes = await hub.cluster_nodes()
        hub.attach(proc)
        reader = asyncio.get_running_loop().create_task(self._read(proc, it))
        try:
            yield mh.EngineMessage(registered=mh.Registered(
                process_id=proc.id, module_code=code, vendor=vendor.id,
                node_id=hub.engine.cfg.node_id, offer_timeout_ms=int(vendor.offer_timeout * 1000),
                engine_version=__version__, cluster_nodes=nodes))
            outbox = proc.outbox
            while True:
                msg = await outbox.get()
                if msg is None or proc.closed:
                    break
                yield msg
        finally:
            reader.cancel()
            hub.detach(proc, "stream ended")

    async def _read(self, proc: VendorProcess, it) -> None:
        module = proc.module
        try:
            async for msg in it:
                kind = msg.WhichOneof("kind")
                if kind in ("command", "take", "decline"):
                    module.dispatch(proc, kind, getattr(msg, kind))
                elif kind == "ping":
                    proc.send(mh.EngineMessage(pong=mh.Pong(nonce=msg.ping.nonce)))
                elif kind == "register":
                    log.info("%s: ignoring a second Register", proc.label())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.info("vendor process %s: stream read ended: %s", proc.label(), exc)
        finally:
            # The vendor closed its side or vanished: end the response stream too,
            # which detaches the process (its sessions go to fallback at once).
            proc.hub.detach(proc, "stream closed")
            proc.outbox.put_nowait(None)


class ControlServer:
    """The running gRPC server; `stop(grace)` ends it."""

    def __init__(self, engine):
        self.engine = engine
        self.authority = Authority(engine.cfg)
        self.hub = ControlHub(engine, self.authority)
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.health = health.aio.HealthServicer()
        self.sessions = SessionsService(engine, self.authority, self.hub)
        self.billing = BillingService(engine, self.authority, self.sessions)
        if getattr(engine, "accountant_client", None) is None:
            from engine.accounting.client import BillingClient

            engine.accountant_client = BillingClient(engine)
        self.started = time.monotonic()

    async def start(self) -> None:
        engine = self.engine
        # API keys' calls are counted and stamped before their handler runs.
        self.metering = ApiMeter.shared(engine)
        self.metering.restamp_top_ups()
        server = grpc.aio.server(options=SERVER_OPTIONS,
                                 interceptors=[metering_interceptor(self.metering)])
        pb.module_host_pb2_grpc.add_ModuleHostServicer_to_server(ModuleHostService(self.hub),
                                                                 server)
        pb.sessions_pb2_grpc.add_SessionsServicer_to_server(self.sessions, server)
        pb.billing_pb2_grpc.add_BillingServicer_to_server(self.billing, server)
        pb.call_center_pb2_grpc.add_CallCenterServicer_to_server(
            CallCenterService(engine, self.authority), server)
        self.verify = VerifyService(engine, self.authority, self.sessions)
        pb.services_pb2_grpc.add_SurveyServicer_to_server(SurveyService(engine, self.authority),
                                                          server)
        pb.services_pb2_grpc.add_VerifyServicer_to_server(self.verify, server)
        pb.messages_pb2_grpc.add_MessagesServicer_to_server(
            MessagesService(engine, self.authority), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (pb.SERVICE_MODULE_HOST, pb.SERVICE_SESSIONS, health.SERVICE_NAME,
                 reflection.SERVICE_NAME)
        names += (pb.SERVICE_CALL_CENTER,)
        names += (pb.SERVICE_BILLING,)
        names += (pb.SERVICE_SURVEY, pb.SERVICE_VERIFY, pb.SERVICE_MESSAGES)
        reflection.enable_server_reflection(names, server)
        addr = engine.cfg.grpc_addr
        creds = server_credentials(engine.cfg.raw.get("engine", {}))
        try:
            port = server.add_secure_port(addr, creds) if creds is not None \
                else server.add_insecure_port(addr)
        except RuntimeError as exc:
            raise OSError(f"cannot listen for gRPC on {addr}: {exc}") from None
        if port == 0:
            raise OSError(f"cannot listen for gRPC on {addr}")
        self.port = port
        engine.grpc_port = port
        await server.start()
        self.server = server
        for name in ("", pb.SERVICE_MODULE_HOST, pb.SERVICE_SESSIONS, pb.SERVICE_BILLING):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if hasattr(engine.accountant_client, "start"):
            engine.accountant_client.start()     # the accountant's events reach Watch
        log.info("gRPC control API on %s port %d%s", addr.rsplit(":", 1)[0], port,
                 " (TLS)" if creds is not None else "")

    @property
    def vendors(self) -> ControlHub:
        return self.hub

    async def stop(self, grace: float | None = 0.5) -> None:
        """Stop serving: health says NOT_SERVING, streams end after `grace` seconds."""
        self.hub.stopping = True
        with contextlib.suppress(Exception):
            await self.health.enter_graceful_shutdown()
        self.sessions.close()
        await self.sessions.forwarder.close()
        if getattr(self, "verify", None) is not None:
            self.verify.close()
        if self.server is not None:
            await self.server.stop(grace)
            self.server = None
        if getattr(self, "metering", None) is not None:
            await self.metering.aclose()
        client = getattr(self.engine, "accountant_client", None)
        if hasattr(client, "close"):
            await client.close()


async def start_control(engine) -> ControlServer:
    """Start the control API for `engine` on its loop; the engine keeps the result."""
    srv = ControlServer(engine)
    await srv.start()
    return srv


def grpc_target(engine) -> str:
    """host:port a client on this machine reaches the engine's control API at."""
    host = engine.cfg.grpc_addr.rsplit(":", 1)[0].strip("[]")
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    return f"[{host}]:{engine.grpc_port}" if ":" in host else f"{host}:{engine.grpc_port}"


__all__ = ["start_control", "ControlServer", "ModuleHostService", "grpc_target"]
