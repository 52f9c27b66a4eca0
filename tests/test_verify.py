"""`baton.verify`: one-time codes created over gRPC and proven by a real PJSIP
endpoint: called by the engine (which speaks the code, checked in what PJSIP
recorded), or calling in and keying the code as RFC 4733 DTMF; wrong codes,
the attempt limit, expiry, the Check RPC and the `verify.result` events."""
from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3

import grpc
import numpy as np
import pytest

from engine.config.load import ConfigError, from_dict
from engine.modules.services.verify import user_of
from tests.helpers import engine_config
from tests.services_helpers import (OTHER_TOKEN, Watcher, control, correlation, engine_process, heard_clearly,
                                    finish, metadata, peer, prerender, read_wav, write_config)

MESSAGE = "Your verification code is"
PROMPT = "Please enter your verification code, then press pound."
INVALID = "That code is not correct. Please try again."
VERIFIED = "Thank you. Your code is verified."
FAILED = "Sorry, the code could not be verified. Goodbye."
MISSING = "Sorry, there is no code to verify for this number. Goodbye."
EXPIRED = "Sorry, this code has expired. Goodbye."
DIGITS = [str(d) for d in range(10)]

APP = """
[apps.verify]
start = "check"

[apps.verify.nodes.check]
module = "baton.verify"
outlets = { verified = "welcome", failed = "hangup", expired = "hangup" }
params = { timeout = 3, retries = 1, trust_from = true }

[apps.verify.nodes.welcome]
module = "baton.play"
params = { text = "Welcome." }
"""


def _config(tmp_path, app: str = APP) -> str:
    return write_config(tmp_path, app, {"2300": '{ app = "verify" }'})


def _stubs(ch):
    from proto import pb

    return (pb, pb.services_pb2_grpc.VerifyStub(ch), pb.sessions_pb2_grpc.SessionsStub(ch))


# -- config and pieces ---------------------------------------------------------------

@pytest.mark.parametrize("params, error", [
    ({"mode": "talk"}, "params.mode: collect or speak, not 'talk'"),
    ({"message": "Your code."}, "params.message: must contain {code} once"),
    ({"repeat": 9}, "params.repeat: an integer from 1 to 5"),
    ({"prompt": ""}, "params.prompt: a non-empty string"),
    ({"timeout": 0}, "params.timeout: a number from 0.5 to 120"),
    ({"pin": "1234"}, "params.pin: unknown key"),
    ({"trust_from": "yes"}, "params.trust_from: true or false"),
])
def test_bad_params_are_refused_at_load(params, error):
    cfg = engine_config()
    cfg["apps"] = {"a": {"start": "v", "nodes": {"v": {"module": "baton.verify",
                                                       "params": params}}}}
    with pytest.raises(ConfigError) as exc:
        from_dict(cfg, "v.toml")
    assert f"v.toml: apps.a.nodes.v.{error}" in str(exc.value)


def test_a_replaced_code_is_dropped_from_memory(tmp_path):
    import types

    from engine.modules.services.verify import VerifyService

    eng = types.SimpleNamespace(cfg=types.SimpleNamespace(data_dir=str(tmp_path)), loop=None,
                                listeners=[])
    svc = VerifyService(eng)
    try:
        v1, code = svc.create("demo", "sip:+1555@x", "call")
        svc.to_speak[v1.id] = code
        v2, code2 = svc.create("demo", "tel:+1555", "call")
        svc.to_speak[v2.id] = code2
        # The first code will never be spoken: it must not stay in clear until its expiry.
        assert svc.get("demo", v1.id).status == "canceled"
        assert list(svc.to_speak) == [v2.id]
    finally:
        svc.close()


def test_a_check_off_the_loop_raises_its_event_on_the_loop(tmp_path):
    import threading
    import types

    from engine.modules.services.verify import VerifyService

    loop = asyncio.new_event_loop()
    seen = []
    eng = types.SimpleNamespace(
        cfg=types.SimpleNamespace(data_dir=str(tmp_path)), loop=loop, listeners=[object()],
        sessions={}, notify=lambda s, event, d: seen.append(
            (event, d["status"], threading.current_thread() is threading.main_thread())))
    svc = VerifyService(eng)
    try:
        v, code = svc.create("demo", "tel:+1555", "none")

        async def check_in_a_thread():
            # As the module does: the SQLite work in a worker thread.
            await asyncio.to_thread(svc.check, "demo", v.id, code)
            await asyncio.sleep(0)

        loop.run_until_complete(check_in_a_thread())
        assert seen == [("verify.result", "verified", True)]
    finally:
        svc.close()
        loop.close()


class _ThreadsSeen:
    """A sqlite3 connection that notes the thread of every statement."""

    def __init__(self, db):
        self.db = db
        self.threads: list[str] = []

    def execute(self, *args):
        import threading

        self.threads.append(threading.current_thread().name)
        return self.db.execute(*args)

    def close(self):
        self.db.close()


def test_the_api_keeps_sqlite_off_the_loop_in_order(tmp_path):
    """Create, Check and Get (and the expiry) run their SQLite statements on the
    store's one thread, in the order asked, with the same answers as before."""
    import threading
    import types

    from proto import pb
    from control.auth import AuthError
    from control.services_api import VerifyService as VerifyApi
    from engine.modules.services import verify as verify_mod

    loop = asyncio.new_event_loop()
    seen = []
    eng = types.SimpleNamespace(
        cfg=types.SimpleNamespace(data_dir=str(tmp_path), accounts={"demo": None, "other": None}),
        loop=loop, listeners=[object()], sessions={},
        notify=lambda s, event, d: seen.append(
            (d["status"], threading.current_thread() is threading.main_thread())))

    class Authority:
        def account(self, metadata):
            return dict(metadata)["account"]

        def scope(self, metadata):
            return dict(metadata).get("account")          # none: an operator

    class Context:
        def __init__(self, account=None):
            self.md = (("account", account),) if account else ()

        def invocation_metadata(self):
            return self.md

        async def abort(self, code, message):
            raise AuthError(code, message)

    async def scenario():
        svc = verify_mod.service_for(eng)      # opened on the loop's thread, as the engine does
        db = svc._db = _ThreadsSeen(svc._db)
        api = VerifyApi(eng, Authority(), sessions=None)
        sv = pb.services_pb2
        demo = Context("demo")
        # Many at once: each Check still sees the code its Create wrote.
        made = await asyncio.gather(*(api.Create(sv.VerifyCreateRequest(
            to=f"+1555{i}", channel="none", code="4821"), demo) for i in range(8)))
        checked = await asyncio.gather(*(api.Check(sv.VerifyCheckRequest(
            verification_id=v.verification_id, code="4821" if i % 2 else "1111"), demo)
            for i, v in enumerate(made)))
        assert [c.valid for c in checked] == [bool(i % 2) for i in range(8)]
        assert [c.verification.attempts for c in checked] == [1] * 8
        # By address, and by an operator (no account: every account's).
        by_to = await api.Check(sv.VerifyCheckRequest(to="tel:+15550", code="4821"), demo)
        assert by_to.valid and by_to.verification.verification_id == made[0].verification_id
        got = await api.Get(sv.VerifyGetRequest(verification_id=made[1].verification_id),
                            Context())
        assert got.status == "verified" and got.account == "demo"
        for ctx in (Context("other"), Context()):
            with pytest.raises(AuthError) as err:
                await api.Get(sv.VerifyGetRequest(verification_id="VEnothing"), ctx)
            assert err.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(AuthError) as err:
            await api.Create(sv.VerifyCreateRequest(to="1555", channel="none", code="12"), demo)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.message.startswith("code:")
        # An expiry: armed from the store's thread, checked there, announced on the loop.
        short = await api.Create(sv.VerifyCreateRequest(to="+1666", channel="none",
                                                        ttl_seconds=1), demo)
        for _ in range(100):
            if ("expired", True) in seen:
                break
            await asyncio.sleep(0.05)
        got = await api.Get(sv.VerifyGetRequest(verification_id=short.verification_id), demo)
        assert got.status == "expired"
        return db.threads

    try:
        threads = loop.run_until_complete(scenario())
        assert threads and all(t.startswith("baton-verify") for t in threads), set(threads)
        assert seen.count(("verified", True)) == 5 and ("expired", True) in seen, seen
        assert all(on_loop for _, on_loop in seen), seen
    finally:
        eng.verify_service.close()
        loop.close()


def test_callers_are_matched_by_user_or_number():
    assert user_of("sip:+15551234@example.com;user=phone") == "15551234"
    assert user_of("<sip:pjsip@127.0.0.1:5062>") == "pjsip"
    assert user_of("tel:+15551234") == "15551234"
    assert user_of("+15551234") == "15551234"


# -- the engine calls out and speaks the code ----------------------------------------

@pytest.mark.interop
async def test_call_out_speaks_the_code_then_check_verifies_it(tmp_path):
    pytest.importorskip("pjsua2")
    heard = tmp_path / "heard.wav"
    with engine_process(_config(tmp_path)) as eng:
        pcm = await prerender(eng, MESSAGE, *DIGITS)
        async with control(eng) as ch, Watcher(ch) as w:
            pb, verify, sessions = _stubs(ch)
            sv = pb.services_pb2
            created = []

            async def ready(port):
                created.append(await verify.Create(sv.VerifyCreateRequest(
                    to=f"sip:pjsip@127.0.0.1:{port}", channel="call", code="4821"),
                    metadata=metadata()))

            r = await peer("answer", "--record", str(heard), "--max", "25", ready=ready,
                           log=tmp_path / "pjsip.log")
            v = created[0]
            assert v.status == "pending" and v.call_outcome == "calling" and v.code == ""
            assert v.code_length == 4 and v.attempts_left == 5
            assert r["hung_up_by"] == "engine", r["_context"]
            got = await verify.Get(sv.VerifyGetRequest(verification_id=v.verification_id),
                                   metadata=metadata())
            assert got.call_outcome == "answered" and got.session_id and got.status == "pending"
            hist = await sessions.History(pb.sessions_pb2.HistoryRequest(session_id=got.session_id),
                                          metadata=metadata())
            assert [(s.module, s.reason) for s in hist.spans] == [("baton.verify", "initial")]

            # What PJSIP heard: the message and the code's digits, not other digits.
            rec = read_wav(heard)
            said = np.concatenate([pcm[MESSAGE]] + [pcm[d] for d in "4821"])
            assert heard_clearly(said, rec) > 0.8
            for d in "4821":
                assert heard_clearly(pcm[d], rec) > 0.8, d
            for d in "3569":
                assert correlation(pcm[d], rec) < 0.6, d

            # The web page's side: a wrong code, the right one, then nothing more to check.
            wrong = await verify.Check(sv.VerifyCheckRequest(
                verification_id=v.verification_id, code="0000"), metadata=metadata())
            assert not wrong.valid and wrong.verification.status == "pending"
            assert wrong.verification.attempts == 1 and wrong.verification.attempts_left == 4
            right = await verify.Check(sv.VerifyCheckRequest(
                to=f"sip:pjsip@127.0.0.1", code="4821"), metadata=metadata())
            assert right.valid and right.verification.status == "verified"
            again = await verify.Check(sv.VerifyCheckRequest(
                verification_id=v.verification_id, code="4821"), metadata=metadata())
            assert not again.valid and again.verification.status == "verified"
            assert again.verification.attempts == 2
            await w.wait(lambda: w.of("verify.result"), what="verify.result")
            assert [d["status"] for d in w.details("verify.result")] == ["verified"]
            assert w.details("verify.result")[0]["verification_id"] == v.verification_id

            # Another account sees nothing of it.
            for call in (verify.Get(sv.VerifyGetRequest(verification_id=v.verification_id),
                                    metadata=metadata(OTHER_TOKEN)),
                         verify.Check(sv.VerifyCheckRequest(verification_id=v.verification_id,
                                                            code="4821"),
                                      metadata=metadata(OTHER_TOKEN))):
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await call
                assert exc.value.code() == grpc.StatusCode.NOT_FOUND
        finish(eng)
    # The code is stored only as a salted HMAC.
    db = sqlite3.connect(os.path.join(eng.data_dir, "services", "verify.db"))
    rows = db.execute("SELECT code_hash FROM verifications").fetchall()
    # (Not "4821 not in the hex": a 64-digit hex string holds any 4 digits 1 time in 1,000.)
    plain = {"4821", hashlib.sha256(b"4821").hexdigest()}
    assert rows and all(r[0] not in plain and len(r[0]) == 64 for r in rows)


async def test_bad_requests_name_the_field(tmp_path):
    with engine_process(_config(tmp_path)) as eng:
        async with control(eng) as ch:
            pb, verify, _ = _stubs(ch)
            sv = pb.services_pb2
            cases = [
                (verify.Create, sv.VerifyCreateRequest(to="", channel="call"), "to:"),
                (verify.Create, sv.VerifyCreateRequest(to="1555", channel="call"), "to:"),
                (verify.Create, sv.VerifyCreateRequest(to="1555", channel="fax"), "channel:"),
                (verify.Create, sv.VerifyCreateRequest(to="1555", channel="sms"), "to:"),
                (verify.Create, sv.VerifyCreateRequest(to="1555", channel="none", code_length=3),
                 "code_length:"),
                (verify.Create, sv.VerifyCreateRequest(to="1555", channel="none", code="12ab"),
                 "code:"),
                (verify.Create, sv.VerifyCreateRequest(to="1555", channel="none", ttl_seconds=90000),
                 "ttl_seconds:"),
                (verify.Create, sv.VerifyCreateRequest(to="1555", channel="none", max_attempts=50),
                 "max_attempts:"),
                (verify.Create, sv.VerifyCreateRequest(to="1555", channel="none", app="x"),
                 "app:"),
                (verify.Check, sv.VerifyCheckRequest(verification_id="VE1", code=""), "code:"),
                (verify.Check, sv.VerifyCheckRequest(code="1234"), "verification_id:"),
                (verify.Get, sv.VerifyGetRequest(), "verification_id:"),
                # Longer than any real id or address: refused before any lookup.
                (verify.Get, sv.VerifyGetRequest(verification_id="V" * 100_000),
                 "verification_id:"),
                (verify.Check, sv.VerifyCheckRequest(to="1" * 100_000, code="1234"), "to:"),
                (verify.Create, sv.VerifyCreateRequest(to="sip:a@127.0.0.1", channel="call",
                                                       app="a" * 100_000), "app:"),
            ]
            for rpc, req, field in cases:
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await rpc(req, metadata=metadata())
                assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (req, exc.value)
                assert exc.value.details().startswith(field), exc.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await verify.Get(sv.VerifyGetRequest(verification_id="VEnothing"),
                                 metadata=metadata())
            assert exc.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await verify.Get(sv.VerifyGetRequest(verification_id="VEnothing"))
            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # A code made for a number: returned once (channel none), never stored in clear.
            v = await verify.Create(sv.VerifyCreateRequest(to="+1555000111", channel="none"),
                                    metadata=metadata())
            assert len(v.code) == 6 and v.code.isdigit()
            got = await verify.Get(sv.VerifyGetRequest(verification_id=v.verification_id),
                                   metadata=metadata())
            assert got.code == "" and got.status == "pending"
            # A newer code for the same number replaces it.
            await verify.Create(sv.VerifyCreateRequest(to="tel:+1555000111", channel="none"),
                                metadata=metadata())
            got = await verify.Get(sv.VerifyGetRequest(verification_id=v.verification_id),
                                   metadata=metadata())
            assert got.status == "canceled"
        finish(eng)


# -- the caller calls in and keys the code -------------------------------------------

async def _create_inbound(verify, sv, **kw):
    return await verify.Create(sv.VerifyCreateRequest(to="sip:pjsip@127.0.0.1", channel="inbound",
                                                      **kw), metadata=metadata())


def _wrong(code: str) -> str:
    return "".join(str((int(c) + 1) % 10) for c in code)


async def _spans(sessions, pb, sid):
    hist = await sessions.History(pb.sessions_pb2.HistoryRequest(session_id=sid),
                                  metadata=metadata())
    return [(s.module, s.reason) for s in hist.spans]


@pytest.mark.interop
async def test_inbound_caller_keys_a_wrong_code_then_the_right_one(tmp_path):
    pytest.importorskip("pjsua2")
    with engine_process(_config(tmp_path)) as eng:
        await prerender(eng, PROMPT, INVALID, VERIFIED, "Welcome.")
        async with control(eng) as ch, Watcher(ch) as w:
            pb, verify, sessions = _stubs(ch)
            sv = pb.services_pb2
            v = await _create_inbound(verify, sv)
            assert len(v.code) == 6
            r = await peer("call", "--number", "2300", "--steps",
                           f"w1.5,{_wrong(v.code)},w2,{v.code},w8", engine=eng,
                           log=tmp_path / "pjsip.log")
            assert r["hung_up_by"] == "engine", r["_context"]
            await w.wait(lambda: w.of("verify.result"), what="verify.result")
            ev = w.of("verify.result")[0]
            assert w.details("verify.result")[0]["status"] == "verified"
            got = await verify.Get(sv.VerifyGetRequest(verification_id=v.verification_id),
                                   metadata=metadata())
            assert got.status == "verified" and got.attempts == 2
            assert got.session_id == ev.session_id
            assert await _spans(sessions, pb, ev.session_id) == \
                [("baton.verify", "initial"), ("baton.play", "outlet:verified")]
            info = await sessions.Get(pb.sessions_pb2.GetRequest(session_id=ev.session_id),
                                      metadata=metadata())
            params = pb.from_struct(info.params)
            assert params["VerifyStatus"] == "verified"
            assert params["VerificationId"] == v.verification_id
        finish(eng)


@pytest.mark.interop
async def test_inbound_attempt_limit_fails_the_code(tmp_path):
    pytest.importorskip("pjsua2")
    with engine_process(_config(tmp_path)) as eng:
        await prerender(eng, PROMPT, INVALID, FAILED)
        async with control(eng) as ch, Watcher(ch) as w:
            pb, verify, sessions = _stubs(ch)
            sv = pb.services_pb2
            v = await _create_inbound(verify, sv, max_attempts=2, code_length=4)
            bad = _wrong(v.code)
            r = await peer("call", "--number", "2300", "--steps", f"w1.5,{bad},w2,{bad},w8",
                           engine=eng, log=tmp_path / "pjsip.log")
            assert r["hung_up_by"] == "engine", r["_context"]
            await w.wait(lambda: w.of("verify.result"), what="verify.result")
            assert [d["status"] for d in w.details("verify.result")] == ["failed"]
            sid = w.of("verify.result")[0].session_id
            # `failed` leads to hangup: the module's span is the only one.
            assert await _spans(sessions, pb, sid) == [("baton.verify", "initial")]
            info = await sessions.Get(pb.sessions_pb2.GetRequest(session_id=sid),
                                      metadata=metadata())
            assert info.end_reason == "outlet:failed"
            assert pb.from_struct(info.params)["VerifyReason"] == "attempts"
            # The right code cannot help any more.
            late = await verify.Check(sv.VerifyCheckRequest(verification_id=v.verification_id,
                                                            code=v.code), metadata=metadata())
            assert not late.valid and late.verification.status == "failed"
            assert late.verification.attempts == 2 and late.verification.attempts_left == 0
        finish(eng)


@pytest.mark.interop
async def test_codes_expire(tmp_path):
    pytest.importorskip("pjsua2")
    with engine_process(_config(tmp_path)) as eng:
        await prerender(eng, EXPIRED)
        async with control(eng) as ch, Watcher(ch) as w:
            pb, verify, sessions = _stubs(ch)
            sv = pb.services_pb2
            # Over the API: the expiry is an event of its own, and Check refuses the code.
            api = await verify.Create(sv.VerifyCreateRequest(to="+1555777", channel="none",
                                                             ttl_seconds=1), metadata=metadata())
            await w.wait(lambda: w.of("verify.result"), what="the expiry event")
            assert w.details("verify.result")[0]["status"] == "expired"
            late = await verify.Check(sv.VerifyCheckRequest(verification_id=api.verification_id,
                                                            code=api.code), metadata=metadata())
            assert not late.valid and late.verification.status == "expired"
            assert late.verification.attempts == 0
            # A caller with an expired code hears so and leaves through `expired`.
            v = await _create_inbound(verify, sv, ttl_seconds=1)
            await w.wait(lambda: len(w.of("verify.result")) == 2, what="the second expiry")
            r = await peer("call", "--number", "2300", "--steps", f"w1.5,{v.code},w8",
                           engine=eng, log=tmp_path / "pjsip.log")
            assert r["hung_up_by"] == "engine", r["_context"]
            await asyncio.sleep(0.2)
            ended = [e for e in w.of("ended")]
            assert len(ended) == 1
            info = await sessions.Get(pb.sessions_pb2.GetRequest(session_id=ended[0].session_id),
                                      metadata=metadata())
            assert info.end_reason == "outlet:expired"
            assert pb.from_struct(info.params)["VerifyStatus"] == "expired"
        finish(eng)


@pytest.mark.interop
async def test_an_inbound_callers_from_proves_nothing_unless_trusted(tmp_path):
    # Without trust_from, and not from a trusted trunk, anyone could send the number's
    # From: the module refuses before it asks for a code, and the code stays pending.
    pytest.importorskip("pjsua2")
    with engine_process(_config(tmp_path, APP.replace(", trust_from = true", ""))) as eng:
        await prerender(eng, MISSING)
        async with control(eng) as ch, Watcher(ch) as w:
            pb, verify, sessions = _stubs(ch)
            sv = pb.services_pb2
            v = await _create_inbound(verify, sv)
            r = await peer("call", "--number", "2300", "--steps", f"w1.5,{v.code},w6",
                           engine=eng, log=tmp_path / "pjsip.log")
            assert r["hung_up_by"] == "engine", r["_context"]
            await w.wait(lambda: w.of("ended"), what="the end of the call")
            sid = w.of("ended")[0].session_id
            info = await sessions.Get(pb.sessions_pb2.GetRequest(session_id=sid),
                                      metadata=metadata())
            assert pb.from_struct(info.params)["VerifyReason"] == "untrusted-caller"
            assert info.end_reason == "outlet:failed"
            got = await verify.Get(sv.VerifyGetRequest(verification_id=v.verification_id),
                                   metadata=metadata())
            assert got.status == "pending" and got.attempts == 0
        finish(eng)
