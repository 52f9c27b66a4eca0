"""`baton.phone_tree`: its config checks, and a real PJSIP caller keying RFC 4733
DTMF through nested menus of an engine run by its own CLI."""
from __future__ import annotations

import asyncio
import subprocess

import pytest

from engine.config.load import ConfigError, from_dict
from tests.helpers import BATON, engine_config
from tests.services_helpers import (Watcher, control, correlation, engine_process, heard_clearly, finish,
                                    metadata, peer, prerender, read_wav, write_config)

MAIN = "Main menu. For sales, press 1. For support, press 2. To hang up, press 9."
SALES = "Sales. For orders, press 2. To go back, press star."
INVALID = "Sorry, that is not a valid choice."

TREE = f"""
[apps.tree]
start = "tree"

[apps.tree.nodes.tree]
module = "baton.phone_tree"
outlets = {{ orders = "orders", timeout = "goodbye" }}

[apps.tree.nodes.tree.params]
timeout = 1.5
retries = 1
invalid_prompt = "{INVALID}"

[apps.tree.nodes.tree.params.menus.main]
prompt = "{MAIN}"
choices = {{ "1" = "menu:sales", "2" = "support", "9" = "hangup" }}

[apps.tree.nodes.tree.params.menus.sales]
prompt = "{SALES}"
choices = {{ "2" = "outlet:orders", "*" = "back" }}

[apps.tree.nodes.orders]
module = "baton.play"
params = {{ text = "Orders." }}

[apps.tree.nodes.support]
module = "baton.play"
params = {{ text = "Support." }}

[apps.tree.nodes.goodbye]
module = "baton.play"
params = {{ text = "Goodbye." }}
"""


# -- config -------------------------------------------------------------------------

def _load(params: dict, outlets: dict | None = None) -> str:
    cfg = engine_config()
    cfg["apps"] = {"a": {"start": "t", "nodes": {
        "t": {"module": "baton.phone_tree", "params": params, "outlets": outlets or {}},
        "bye": {"module": "baton.play", "params": {"text": "Goodbye."}}}}}
    try:
        from_dict(cfg, "t.toml")
    except ConfigError as exc:
        return str(exc)
    return "ok"


def _menu(**kw) -> dict:
    return {"menus": {"main": {"prompt": "Hello.", "choices": {"1": "bye"}, **kw}}}


@pytest.mark.parametrize("params, outlets, error", [
    ({}, None, "params.menus: a table of menus is required"),
    ({"menus": {"main": {"choices": {"1": "bye"}}}}, None,
     "params.menus.main.prompt: required (or prompt_file)"),
    ({"menus": {"main": {"prompt": "x", "prompt_file": "/nonexistent.wav", "choices": {"1": "bye"}}}},
     None, "params.menus.main.prompt: give prompt or prompt_file, not both"),
    ({"menus": {"main": {"prompt_file": "/nonexistent.wav", "choices": {"1": "bye"}}}}, None,
     "params.menus.main.prompt_file: no such file '/nonexistent.wav'"),
    ({"menus": {"main": {"prompt": "x"}}}, None,
     "params.menus.main.choices: a table of key = target is required"),
    ({"menus": {"main": {"prompt": "x", "choices": {"11": "bye"}}}}, None,
     "params.menus.main.choices.11: a choice is one DTMF key"),
    ({"menus": {"main": {"prompt": "x", "choices": {"1": "menu:nope"}}}}, None,
     "params.menus.main.choices.1: no menu 'nope' (menus: main)"),
    ({"menus": {"main": {"prompt": "x", "choices": {"1": "nowhere"}}}}, None,
     "params.menus.main.choices.1: 'nowhere' is neither a node of this app"),
    ({"menus": {"main": {"prompt": "x", "choices": {"1": "baton.nothing"}}}}, None,
     "params.menus.main.choices.1: unknown module 'baton.nothing'"),
    ({**_menu(), "start": "other"}, None, "params.start: must name one of the menus (main)"),
    (_menu(timeout=0), None, "params.menus.main.timeout: a number from 0.5 to 120"),
    (_menu(retries=1.5), None, "params.menus.main.retries: an integer from 0 to 10"),
    (_menu(colour="red"), None, "params.menus.main.colour: unknown key"),
    ({**_menu(), "prompt": "x"}, None, "params.prompt: unknown key"),
    (_menu(on_timeout="menu:gone"), None, "params.menus.main.on_timeout: no menu 'gone'"),
])
def test_bad_params_are_refused_at_load(params, outlets, error):
    assert f"t.toml: apps.a.nodes.t.{error}" in _load(params, outlets)


def test_good_params_load():
    assert _load(_menu()) == "ok"
    # A bare name that is a wired outlet of the node is that outlet.
    assert _load({"menus": {"main": {"prompt": "x", "choices": {"1": "sales", "2": "outlet:x",
                                                                "*": "back", "0": "hangup",
                                                                "3": "sip:a@127.0.0.1"}}}},
                 {"sales": "bye"}) == "ok"


def test_the_engine_refuses_to_start_with_a_bad_tree(tmp_path):
    bad = TREE.replace('"1" = "menu:sales"', '"1" = "menu:salse"')
    cfg = write_config(tmp_path, bad, {"2100": '{ app = "tree" }'})
    p = subprocess.run([BATON, "serve", "--config", cfg, "--sip-addr", "127.0.0.1:0",
                        "--data-dir", str(tmp_path / "data"), "--no-accountant"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode != 0
    assert ("apps.tree.nodes.tree.params.menus.main.choices.1: no menu 'salse' "
            "(menus: main, sales)") in p.stderr + p.stdout


# -- calls --------------------------------------------------------------------------

async def _session(ch, watcher: Watcher):
    from proto import pb

    stub = pb.sessions_pb2_grpc.SessionsStub(ch)
    sids = {e.session_id for e in watcher.of("phone_tree.menu")}
    assert len(sids) == 1, watcher.events
    sid = sids.pop()
    info = await stub.Get(pb.sessions_pb2.GetRequest(session_id=sid), metadata=metadata())
    hist = await stub.History(pb.sessions_pb2.HistoryRequest(session_id=sid), metadata=metadata())
    return pb.from_struct(info.params), [(s.module, s.reason) for s in hist.spans]


@pytest.mark.interop
async def test_caller_walks_the_tree_with_barge_in_invalid_key_and_back(tmp_path):
    pytest.importorskip("pjsua2")
    cfg = write_config(tmp_path, TREE, {"2100": '{ app = "tree" }'})
    heard = tmp_path / "heard.wav"
    with engine_process(cfg) as eng:
        pcm = await prerender(eng, MAIN, SALES, INVALID, "Orders.", "Goodbye.")
        async with control(eng) as ch, Watcher(ch) as w:
            # 1 during the main prompt (barge-in), 7 is no choice in sales, * goes back
            # to main, then 1 and 2: the orders outlet, whose node says "Orders." and
            # ends the call.
            r = await peer("call", "--number", "2100", "--record", str(heard),
                           "--steps", "w1.5,1,w1.2,7,w1.5,*,w1.5,1,w1.2,2,w8", engine=eng,
                           log=tmp_path / "pjsip.log")
            await w.wait(lambda: w.of("ended"), what="the end of the call")
            params, spans = await _session(ch, w)
        assert r["hung_up_by"] == "engine", r["_context"]
        assert r["keys_sent"] == ["1", "7", "*", "1", "2"], r
        assert [d["path"] for d in w.details("phone_tree.menu")] == \
            ["main", "main/sales", "main", "main/sales"]
        assert params["PhoneTreePath"] == "main/sales" and params["Digits"] == "2", params
        assert spans == [("baton.phone_tree", "initial"), ("baton.play", "outlet:orders")]
        got = read_wav(heard)
        # The main prompt's start was heard, its end never (a key stopped it twice);
        # the invalid-choice prompt and the orders node were heard.
        main = pcm[MAIN]
        assert heard_clearly(main[:4000], got) > 0.8
        assert correlation(main[-8000:], got) < 0.5
        assert heard_clearly(pcm[INVALID][:6000], got) > 0.8
        assert heard_clearly(pcm["Orders."], got) > 0.8
        finish(eng)


@pytest.mark.interop
async def test_no_key_repeats_then_leaves_through_timeout(tmp_path):
    pytest.importorskip("pjsua2")
    cfg = write_config(tmp_path, TREE, {"2100": '{ app = "tree" }'})
    heard = tmp_path / "heard.wav"
    with engine_process(cfg) as eng:
        pcm = await prerender(eng, MAIN, "Goodbye.")
        async with control(eng) as ch, Watcher(ch) as w:
            r = await peer("call", "--number", "2100", "--record", str(heard), "--steps", "w25",
                           engine=eng, log=tmp_path / "pjsip.log")
            await w.wait(lambda: w.of("ended"), what="the end of the call")
            params, spans = await _session(ch, w)
        assert r["hung_up_by"] == "engine", r["_context"]
        assert spans == [("baton.phone_tree", "initial"), ("baton.play", "outlet:timeout")]
        assert params["PhoneTreePath"] == "main", params
        got = read_wav(heard)
        # The whole main prompt, twice (retries = 1), then goodbye.
        assert heard_clearly(pcm[MAIN][-8000:], got) > 0.8
        assert heard_clearly(pcm["Goodbye."], got) > 0.8
        finish(eng)


@pytest.mark.interop
async def test_demo_tree_bridges_to_the_echo_desk(tmp_path):
    """examples/demo.toml's 5100: 1 leaves through `desk`, a bridge to 1001 (the echo)."""
    pytest.importorskip("pjsua2")
    from proto import pb

    from tests.helpers import DEMO, EngineProcess

    token = (("authorization", "Bearer demo-api-token-change-me-0123456789"),)
    with EngineProcess(DEMO, extra=["--no-accountant"]) as eng:
        async with control(eng) as ch:
            stub = pb.sessions_pb2_grpc.SessionsStub(ch)
            events = []

            async def watch():
                async for ev in stub.Watch(pb.sessions_pb2.WatchRequest(), metadata=token):
                    events.append(ev)

            task = asyncio.get_running_loop().create_task(watch())
            await asyncio.sleep(0.3)
            r = await peer("call", "--number", "5100", "--steps", "w1.5,1,w2", engine=eng,
                           log=tmp_path / "pjsip.log")
            for _ in range(50):
                if sum(e.kind == "ended" for e in events) == 2:
                    break
                await asyncio.sleep(0.1)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            sid = next(e.session_id for e in events if e.kind == "phone_tree.menu")
            hist = await stub.History(pb.sessions_pb2.HistoryRequest(session_id=sid),
                                      metadata=token)
        assert r["hung_up_by"] == "peer", r["_context"]
        assert [(s.module, s.reason) for s in hist.spans] == \
            [("baton.phone_tree", "initial"), ("baton.bridge", "outlet:desk")]
        finish(eng)
