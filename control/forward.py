"""Control requests about a session another node of the cluster owns (docs/cluster.md).

A `Sessions` request (Get, History, Transition, Cost) naming a session this node does not
hold is looked up in the cluster's session directory (engine/sessions/directory.py) and
sent on to the owner node's gRPC API with the caller's own credentials, so the owner
checks them exactly as if it had been asked directly; its answer, or its error, goes back
unchanged. With `[cluster] forward = false` the caller gets FAILED_PRECONDITION naming the
node (and its gRPC address) to ask instead. A forwarded request carries
`baton-forwarded: NODE` and is never forwarded again.
"""
from __future__ import annotations

import logging

import grpc

from control.metering import COUNTED, ApiMeter, bearer
from proto import pb

log = logging.getLogger("baton.control.forward")

FORWARDED = "baton-forwarded"
TIMEOUT = 10.0
# Call metadata that belongs to one hop, not to the caller's request.
_HOP = ("user-agent", "grpc-", ":")


class Forwarder:
    """One node's gRPC clients of its peers, one channel per peer address."""

    def __init__(self, engine):
        self.engine = engine
        self.channels: dict[str, grpc.aio.Channel] = {}
        self.forwarded = 0

    def _channel(self, target: str) -> grpc.aio.Channel:
        ch = self.channels.get(target)
        if ch is None:
            eng = self.engine.cfg.raw.get("engine", {})
            cert, key = eng.get("grpc_tls_cert"), eng.get("grpc_tls_key")
            if cert and key:
                # Peers share the cluster's certificate set: the node's own pair is its
                # client certificate too (for grpc_tls_client_ca).
                with open(cert, "rb") as f:
                    chain = f.read()
                with open(key, "rb") as f:
                    pkey = f.read()
                creds = grpc.ssl_channel_credentials(root_certificates=chain,
                                                     private_key=pkey, certificate_chain=chain)
                ch = grpc.aio.secure_channel(target, creds)
            else:
                ch = grpc.aio.insecure_channel(target)
            self.channels[target] = ch
        return ch

    async def elsewhere(self, context, method: str, request, sid: str):
        """The owner node's answer to `method(request)` if another node owns session
        `sid`; None if no other node does (the caller answers NOT_FOUND)."""
        from engine.sessions.directory import DirectoryUnavailable

        directory = self.engine.directory
        if directory is None or not sid:
            return None
        md = context.invocation_metadata() or ()
        if any(k == FORWARDED for k, _v in md):
            return None                      # one hop only: the directory was stale
        try:
            owner = await directory.owner(sid)
        except DirectoryUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"session_id: {sid!r} is not on this node and the cluster's "
                                f"session directory cannot be reached ({exc}); try again")
        if owner is None or owner.node == self.engine.cfg.node_id:
            return None
        if not self.engine.cfg.cluster.forward or not owner.grpc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"session_id: session {sid!r} lives on node {owner.node!r} "
                                f"(gRPC {owner.grpc or 'not reachable'}); ask that node")
        passed = [(k, v) for k, v in md if not k.startswith(_HOP) and k != COUNTED]
        passed.append((FORWARDED, self.engine.cfg.node_id))
        # An API key's call was counted here: the owner must not count it again.
        ticket = await ApiMeter.shared(self.engine).ticket_for(bearer(md))
        if ticket is not None:
            passed.append((COUNTED, ticket))
        stub = pb.sessions_pb2_grpc.SessionsStub(self._channel(owner.grpc))
        try:
            reply = await getattr(stub, method)(request, metadata=passed, timeout=TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            # The owner's own answer, or the transport's: the caller sees which node it was.
            await context.abort(exc.code(), f"node {owner.node!r} ({owner.grpc}): "
                                            f"{exc.details() or exc.code().name}")
        self.forwarded += 1
        return reply

    async def close(self) -> None:
        for ch in self.channels.values():
            await ch.close()
        self.channels.clear()
