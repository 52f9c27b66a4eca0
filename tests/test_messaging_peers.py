"""Texts with real peers: PJSIP (pjsua2 `Buddy.sendInstantMessage` and
`Account.onInstantMessage`, through `baton text`) against a real `baton serve`
with the demo config, over UDP and TCP."""
from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import BATON, ROOT, served_demo

pytestmark = pytest.mark.interop


def baton_text(*args: str) -> dict:
    p = subprocess.run([BATON, "text", *args, "--json"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"no RESULT line\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return {**json.loads(lines[-1][len("RESULT "):]), "exit": p.returncode}


@pytest.fixture(scope="module")
def engine():
    with served_demo() as eng:
        yield eng


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_pjsip_texts_the_demo_number_and_gets_the_reply(engine, transport):
    target = f"sip:8000@127.0.0.1:{engine.port};transport={transport}"
    r = baton_text(target, "hello ünïcode", "--from", f"pj{transport}")
    assert (r["exit"], r["status"]) == (0, 202), r
    (reply,) = r["replies"]
    assert reply["body"] == 'Baton bot: you said "hello ünïcode". Text AGENT for the desk.'
    assert reply["from"].startswith("<sip:8000@") or "sip:8000@" in reply["from"]
    # The same sender's next text is the same conversation: AGENT moves it to the desk.
    r = baton_text(target, "AGENT", "--from", f"pj{transport}")
    assert r["replies"][0]["body"] == 'Desk: we got "AGENT". Text BOT for the bot.', r


def test_unknown_number_is_404(engine):
    r = baton_text(f"sip:8999@127.0.0.1:{engine.port}", "anyone?")
    assert (r["exit"], r["status"]) == (1, 404), r
