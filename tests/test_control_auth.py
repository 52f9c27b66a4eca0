"""Who may use the control API, over real gRPC on loopback: vendor secrets
(in Register and in metadata), account tokens, argument errors of the
Sessions service, TLS and mutual TLS, health checking and reflection."""
from __future__ import annotations

import os
import subprocess

import pytest

pytest.importorskip("ext.rtp", reason="ext.rtp is not built (make build)")

from tests.vendor_procs.harness import (OTHER_TOKEN, SECRET_A, SECRET_B, TOKEN,  # noqa: E402
                                        bearer, control_config, target)

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc  # noqa: E402

from proto import pb  # noqa: E402
from control.sdk import RegistrationError, VendorClient  # noqa: E402
from tests.helpers import running_engine  # noqa: E402

sp = pb.sessions_pb2


@pytest.mark.parametrize("code,secret,vendor,in_md,status", [
    ("acme.survey", "wrong-secret-0123456789", "", False, grpc.StatusCode.UNAUTHENTICATED),
    ("acme.survey", "wrong-secret-0123456789", "", True, grpc.StatusCode.UNAUTHENTICATED),
    ("acme.survey", "", "", False, grpc.StatusCode.UNAUTHENTICATED),
    ("acme.survey", SECRET_B, "globex", False, grpc.StatusCode.PERMISSION_DENIED),
    ("globex.desk", SECRET_A, "acme", True, grpc.StatusCode.PERMISSION_DENIED),
    ("baton.hold", SECRET_A, "acme", False, grpc.StatusCode.PERMISSION_DENIED),
    ("", SECRET_A, "", False, grpc.StatusCode.INVALID_ARGUMENT),
    ("nodot", SECRET_A, "", False, grpc.StatusCode.INVALID_ARGUMENT),
])
async def test_bad_vendor_credentials_are_refused(code, secret, vendor, in_md, status):
    async with running_engine(control_config()) as eng:
        client = VendorClient(target(eng), code, secret, vendor=vendor, secret_in_metadata=in_md)
        with pytest.raises(RegistrationError) as err:
            await client.start(timeout=5)
        assert err.value.code == status, err.value
        await client.close()
        assert not eng.control.hub.processes


async def test_good_secret_in_metadata_registers():
    async with running_engine(control_config()) as eng:
        client = VendorClient(target(eng), "acme.lookup", SECRET_A, secret_in_metadata=True)
        await client.start()
        assert client.process_id and client.offer_timeout_ms == 1000
        assert "acme.lookup" in eng.registry.vendors
        await client.close()


async def test_register_must_come_first():
    async with running_engine(control_config()) as eng:
        async with grpc.aio.insecure_channel(target(eng)) as ch:
            stub = pb.module_host_pb2_grpc.ModuleHostStub(ch)
            call = stub.Attach()
            await call.write(pb.module_host_pb2.VendorMessage(
                ping=pb.module_host_pb2.Ping(nonce=1)))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "register" in err.value.details()


async def test_sessions_tokens_and_accounts():
    async with running_engine(control_config()) as eng:
        async with grpc.aio.insecure_channel(target(eng)) as ch:
            stub = pb.sessions_pb2_grpc.SessionsStub(ch)
            req = sp.GetRequest(session_id="S-none")
            for md, why in ((None, "missing"), (bearer("x" * 20), "unknown"),
                            ((("authorization", TOKEN),), "Bearer")):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Get(req, metadata=md)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert why in err.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Get(req, metadata=bearer())
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            # Another account's token does not see the session; its own does.
            from tests.test_sessions import Caller

            caller = Caller(eng, "1000")
            await caller.dial()
            sid = next(iter(eng.sessions))
            info = await stub.Get(sp.GetRequest(session_id=sid), metadata=bearer())
            assert info.live and info.module == "baton.hold" and info.account == "demo"
            for rpc, r in ((stub.Get, sp.GetRequest(session_id=sid)),
                           (stub.History, sp.HistoryRequest(session_id=sid)),
                           (stub.Transition, sp.TransitionRequest(session_id=sid,
                                                                  target="baton.echo"))):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await rpc(r, metadata=bearer(OTHER_TOKEN))
                assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert eng.sessions[sid].module.code == "baton.hold"
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Watch(sp.WatchRequest(account="other"), metadata=bearer()):
                    pass
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "account" in err.value.details()
            await caller.bye()
            caller.close()


async def test_sessions_invalid_arguments_name_the_field():
    async with running_engine(control_config()) as eng:
        from tests.test_sessions import Caller

        caller = Caller(eng, "1000")
        await caller.dial()
        sid = next(iter(eng.sessions))
        async with grpc.aio.insecure_channel(target(eng)) as ch:
            stub = pb.sessions_pb2_grpc.SessionsStub(ch)
            cases = [
                (stub.Transition, sp.TransitionRequest(session_id=sid), "target"),
                (stub.Transition, sp.TransitionRequest(session_id=sid, target="no such"),
                 "target"),
                (stub.Transition, sp.TransitionRequest(target="baton.echo"), "session_id"),
                (stub.Get, sp.GetRequest(), "session_id"),
                (stub.Originate, sp.OriginateRequest(to="bob", target="baton.hold"), "to"),
                (stub.Originate, sp.OriginateRequest(to="sip:bob@127.0.0.1"), "target"),
                (stub.Originate, sp.OriginateRequest(to="sip:bob@127.0.0.1", target="nodot"),
                 "target"),
                (stub.Originate, sp.OriginateRequest(to="sip:bob@127.0.0.1", target="baton.hold",
                                                     ring_timeout=-1), "ring_timeout"),
                (stub.Originate, sp.OriginateRequest(**{"to": "sip:bob@127.0.0.1",
                                                        "target": "baton.hold",
                                                        "from": "bob"}), "from"),
            ]
            for rpc, req, field in cases:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await rpc(req, metadata=bearer())
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, err.value)
                assert err.value.details().startswith(field + ":"), err.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Watch(sp.WatchRequest(kinds=["transitions"]),
                                          metadata=bearer()):
                    pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details().startswith("kinds:")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Originate(sp.OriginateRequest(to="sip:bob@127.0.0.1",
                                                         target="acme.survey"),
                                     metadata=bearer())
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION   # nobody attached
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Originate(sp.OriginateRequest(to="sip:bob@127.0.0.1", account="other",
                                                         target="baton.hold"), metadata=bearer())
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        await caller.bye()
        caller.close()


async def test_health_and_reflection():
    async with running_engine(control_config()) as eng:
        async with grpc.aio.insecure_channel(target(eng)) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for name in ("", "baton.v1.ModuleHost", "baton.v1.Sessions"):
                r = await health.Check(health_pb2.HealthCheckRequest(service=name))
                assert r.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)
            names = set()
            async for r in refl.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")])):
                names |= {s.name for s in r.list_services_response.service}
            assert {"baton.v1.ModuleHost", "baton.v1.Sessions",
                    "grpc.health.v1.Health"} <= names
            files = []
            async for r in refl.ServerReflectionInfo(iter([
                    reflection_pb2.ServerReflectionRequest(
                        file_containing_symbol="baton.v1.ModuleHost")])):
                files += r.file_descriptor_response.file_descriptor_proto
            assert files, "the proto descriptors are served"


def _openssl(*args: str, cwd: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: str) -> dict:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.pem", "-days", "2", "-subj", "/CN=baton test CA", cwd=d)
    with open(os.path.join(d, "san.cnf"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", "san.cnf",
                 cwd=d)
    return {k: os.path.join(d, k) for k in ("ca.pem", "server.pem", "server.key", "client.pem",
                                            "client.key")}


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


async def _health(addr: str, creds=None) -> int:
    ch = grpc.aio.secure_channel(addr, creds) if creds is not None \
        else grpc.aio.insecure_channel(addr)
    async with ch:
        r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                       timeout=3)
        return r.status


@pytest.mark.skipif(not any(os.access(os.path.join(p, "openssl"), os.X_OK)
                            for p in os.environ.get("PATH", "").split(os.pathsep)),
                    reason="openssl is not installed")
async def test_tls_and_mutual_tls(tmp_path):
    pki = make_pki(str(tmp_path))
    ca = _read(pki["ca.pem"])
    raw = control_config(grpc_tls_cert=pki["server.pem"], grpc_tls_key=pki["server.key"])
    async with running_engine(raw) as eng:
        addr = target(eng)
        assert await _health(addr, grpc.ssl_channel_credentials(ca)) == 1
        with pytest.raises(grpc.aio.AioRpcError):
            await _health(addr)            # plaintext to a TLS port
        client = VendorClient(addr, "acme.survey", SECRET_A,
                              credentials=grpc.ssl_channel_credentials(ca))
        await client.start()
        await client.close()
    raw = control_config(grpc_tls_cert=pki["server.pem"], grpc_tls_key=pki["server.key"],
                         grpc_tls_client_ca=pki["ca.pem"])
    async with running_engine(raw) as eng:
        addr = target(eng)
        with pytest.raises(grpc.aio.AioRpcError):
            await _health(addr, grpc.ssl_channel_credentials(ca))   # no client certificate
        mtls = grpc.ssl_channel_credentials(ca, _read(pki["client.key"]), _read(pki["client.pem"]))
        assert await _health(addr, mtls) == 1
