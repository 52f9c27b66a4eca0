"""`baton.survey`: its config checks, and real PJSIP callers answering with
RFC 4733 DTMF; results in SQLite, over gRPC and posted to a real aiohttp
receiver that checks Baton's webhook signature."""
from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from aiohttp import web

from engine.config.load import ConfigError, from_dict
from engine.modules.services.survey import SurveyModule
from engine.common.webhooks import verify as verify_signature
from tests.helpers import engine_config
from tests.services_helpers import (OTHER_TOKEN, Watcher, control, engine_process, finish,
                                    metadata, peer, prerender, write_config)

SECRET = "survey-webhook-secret-0123456789"
Q1 = "Was your problem solved? Press 1 for yes, 2 for no."
Q2 = "From 0 to 10, how likely are you to recommend us? Then press pound."
Q3 = "Press 1 to leave a comment."
INTRO = "Please answer three short questions."
OUTRO = "Thank you. Goodbye."
INVALID = "Sorry, that is not a valid answer."


def survey_app(url: str) -> str:
    return f"""
[apps.feedback]
start = "survey"

[apps.feedback.nodes.survey]
module = "baton.survey"
outlets = {{ done = "hangup", incomplete = "sorry" }}

[apps.feedback.nodes.survey.params]
name = "csat"
intro = "{INTRO}"
outro = "{OUTRO}"
webhook_url = "{url}"
webhook_secret = "{SECRET}"
timeout = 2
retries = 1
questions = [
  {{ id = "resolved", say = "{Q1}", allowed = "12" }},
  {{ id = "score", say = "{Q2}", min = 0, max = 10 }},
  {{ id = "comment", say = "{Q3}", allowed = "1", required = false, retries = 0, timeout = 1 }},
]

[apps.feedback.nodes.sorry]
module = "baton.play"
params = {{ text = "Sorry." }}
"""


# -- config -------------------------------------------------------------------------

def _load(params: dict) -> str:
    cfg = engine_config()
    cfg["apps"] = {"a": {"start": "s", "nodes": {"s": {"module": "baton.survey",
                                                       "params": params}}}}
    try:
        from_dict(cfg, "s.toml")
    except ConfigError as exc:
        return str(exc)
    return "ok"


def _q(**kw) -> dict:
    return {"questions": [{"id": "q", "say": "Press 1.", **kw}]}


@pytest.mark.parametrize("params, error", [
    ({}, "params.questions: a list of questions is required"),
    ({"questions": [{"say": "x"}]}, "params.questions.0.id: required"),
    ({"questions": [{"id": "q"}]}, "params.questions.0.say: required (or play)"),
    ({"questions": [{"id": "q", "say": "x"}, {"id": "q", "say": "y"}]},
     "params.questions.1.id: 'q' is used twice"),
    (_q(allowed="1x"), "params.questions.0.allowed: DTMF keys from"),
    (_q(min=3), "params.questions.0.max: required with min"),
    (_q(min=5, max=3), "params.questions.0.max: smaller than min"),
    (_q(allowed="12", min=1, max=2), "params.questions.0.min: give one of allowed, answers or min/max"),
    (_q(answers=[1, 2]), "params.questions.0.answers: a list of key strings"),
    (_q(min=0, max=100, max_digits=2), "params.questions.0.max_digits: 100 has more digits"),
    (_q(timeout="soon"), "params.questions.0.timeout: a number from 0.5 to 120"),
    (_q(required="yes"), "params.questions.0.required: true or false"),
    (_q(colour=1), "params.questions.0.colour: unknown key"),
    ({**_q(), "webhook_url": "http://127.0.0.1/x"},
     "params.webhook_secret: required with webhook_url"),
    ({**_q(), "webhook_url": "ftp://x", "webhook_secret": SECRET},
     "params.webhook_url: an http:// or https:// URL"),
    ({**_q(), "webhook_url": "http://127.0.0.1/x", "webhook_secret": "short"},
     "params.webhook_secret: a string of at least 16 characters"),
    ({**_q(), "name": "has space"}, "params.name: letters, digits"),
])
def test_bad_params_are_refused_at_load(params, error):
    assert f"s.toml: apps.a.nodes.s.{error}" in _load(params)


def test_a_number_routed_straight_to_the_module_is_checked_at_load():
    cfg = engine_config()
    cfg["accounts"]["demo"]["numbers"]["5100"] = {"module": "baton.survey",
                                                   "questions": [{"id": "q"}]}
    with pytest.raises(ConfigError) as exc:
        from_dict(cfg, "s.toml")
    assert "s.toml: accounts.demo.numbers.5100.questions.0.say: required" in str(exc.value)
    cfg["accounts"]["demo"]["numbers"]["5100"] = {"module": "baton.survey", **_q()}
    from_dict(cfg, "s.toml")


def test_the_store_writes_in_order_on_its_own_thread(tmp_path):
    import threading

    from engine.modules.services.survey import SurveyStore

    path = str(tmp_path / "survey.db")
    store = SurveyStore(path)
    seen = []
    start = store.start

    def recording_start(*a, **kw):
        seen.append(threading.current_thread() is threading.main_thread())
        return start(*a, **kw)

    rid = store.new_run_id()
    store.submit(recording_start, "S1", "demo", "csat", "n", "sip:a@b", "5200", run_id=rid)
    store.submit(store.answer, rid, 0, "q", "1", 1)
    store.submit(store.finish, rid, "completed", 123)
    (run,) = store.submit(store.results, "demo").result(timeout=10)
    assert seen == [False]           # never on the caller's (the event loop's) thread
    assert (run["run_id"], run["status"], run["ended_wall_ns"]) == (rid, "completed", 123)
    assert run["answers"][0]["answer"] == "1"
    store.close()
    # Ids handed out in memory continue after a restart.
    again = SurveyStore(path)
    assert again.new_run_id() == rid + 1
    again.close()


def test_answers_are_validated():
    valid = SurveyModule.valid
    assert valid({"allowed": "12"}, "1") and not valid({"allowed": "12"}, "3")
    assert not valid({"allowed": "12"}, "12") and not valid({"allowed": "12"}, "")
    assert valid({"min": 0, "max": 10}, "10") and valid({"min": 0, "max": 10}, "0")
    assert not valid({"min": 0, "max": 10}, "11") and not valid({"min": 1, "max": 10}, "*")
    assert valid({"answers": ["1", "42"]}, "42") and not valid({"answers": ["1", "42"]}, "4")
    assert valid({}, "123") and not valid({}, "")
    assert _load(_q(min=0, max=10)) == "ok"


# -- calls --------------------------------------------------------------------------

class Receiver:
    """An aiohttp webhook receiver that checks every signature."""

    def __init__(self):
        self.messages: list[dict] = []
        self.bad = 0
        self.url = ""
        self.runner = None

    async def start(self) -> "Receiver":
        app = web.Application()
        app.router.add_post("/hooks", self.hook)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/hooks"
        return self

    async def hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not verify_signature(SECRET, request.headers, body):
            self.bad += 1
            return web.json_response({"error": "bad signature"}, status=401)
        self.messages.append(json.loads(body))
        return web.json_response({"ok": True})

    async def stop(self) -> None:
        await self.runner.cleanup()


@pytest.mark.interop
async def test_callers_answer_and_results_are_stored_posted_and_readable(tmp_path):
    pytest.importorskip("pjsua2")
    from proto import pb

    rx = await Receiver().start()
    try:
        cfg = write_config(tmp_path, survey_app(rx.url), {"2200": '{ app = "feedback" }'})
        with engine_process(cfg) as eng:
            await prerender(eng, INTRO, Q1, Q2, Q3, OUTRO, INVALID, "Sorry.")
            async with control(eng) as ch, Watcher(ch) as w:
                # 3 is no answer to question 1, then 1; 11 is out of 0..10, then 7;
                # nothing for the optional comment: skipped.
                r1 = await peer("call", "--number", "2200", "--steps",
                                "w1.5,3,w2.5,1,w1.5,11#,w3,7#,w12", engine=eng,
                                log=tmp_path / "pjsip-1.log")
                # A wrong key twice: incomplete, and the `incomplete` outlet.
                r2 = await peer("call", "--number", "2200", "--steps", "w1.5,3,w2.5,3,w6",
                                engine=eng, log=tmp_path / "pjsip-2.log")
                # A hang-up in the middle: abandoned, with what was answered so far.
                r3 = await peer("call", "--number", "2200", "--steps", "w1.5,2,w1", engine=eng,
                                log=tmp_path / "pjsip-3.log")
                await w.wait(lambda: len(w.of("survey.result")) == 3, what="three results")
                for _ in range(100):
                    if len(rx.messages) == 3:
                        break
                    await asyncio.sleep(0.1)
                stub = pb.services_pb2_grpc.SurveyStub(ch)
                res = await stub.Results(pb.services_pb2.SurveyResultsRequest(survey="csat"),
                                         metadata=metadata())
                other = await stub.Results(pb.services_pb2.SurveyResultsRequest(),
                                           metadata=metadata(OTHER_TOKEN))
                with pytest.raises(grpc.aio.AioRpcError) as bad:
                    await stub.Results(pb.services_pb2.SurveyResultsRequest(limit=5000),
                                       metadata=metadata())
                with pytest.raises(grpc.aio.AioRpcError) as unauth:
                    await stub.Results(pb.services_pb2.SurveyResultsRequest())
                hist = await pb.sessions_pb2_grpc.SessionsStub(ch).History(
                    pb.sessions_pb2.HistoryRequest(session_id=w.of("survey.result")[1].session_id),
                    metadata=metadata())
            assert r1["hung_up_by"] == "engine" and r2["hung_up_by"] == "engine", r1["_context"]
            assert r3["hung_up_by"] == "peer"
            assert rx.bad == 0 and len(rx.messages) == 3, rx.messages
            by_status = {m["data"]["status"]: m for m in rx.messages}
            assert set(by_status) == {"completed", "incomplete", "abandoned"}, json.dumps(rx.messages)
            assert all(m["type"] == "survey.result" for m in rx.messages)
            done = by_status["completed"]["data"]
            assert done["survey"] == "csat" and done["account"] == "demo"
            assert done["caller"].startswith("sip:pjsip@127.0.0.1") and "tag" not in done["caller"]
            assert done["answers"] == [{"question": "resolved", "answer": "1"},
                                       {"question": "score", "answer": "7"},
                                       {"question": "comment", "answer": None}]
            assert by_status["incomplete"]["data"]["answers"] == []
            assert by_status["abandoned"]["data"]["answers"] == [
                {"question": "resolved", "answer": "2"}]
            # Over gRPC: newest first, with attempts per question.
            assert [run.status for run in res.runs] == ["abandoned", "incomplete", "completed"]
            first = res.runs[2]
            assert first.session_id == done["session_id"] and first.ended_wall_ns > 0
            assert [(a.question, a.answer, a.attempts, a.answered) for a in first.answers] == \
                [("resolved", "1", 2, True), ("score", "7", 2, True), ("comment", "", 1, False)]
            assert list(other.runs) == []
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert bad.value.details().startswith("limit:")
            assert unauth.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert [(s.module, s.reason) for s in hist.spans] == \
                [("baton.survey", "initial"), ("baton.play", "outlet:incomplete")]
            finish(eng)
    finally:
        await rx.stop()
