"""SIPp MESSAGE scenarios (tests/sipp/message_*.xml) against a real `baton serve`:
bad input answered in SIP's terms, a MESSAGE inside and outside a dialog, and load."""
from __future__ import annotations

import pytest

from tests.helpers import EngineProcess
from tests.test_interop_sipp import SIPP, finish_engine, run_sipp

pytestmark = [pytest.mark.interop,
              pytest.mark.skipif(SIPP is None, reason="sipp is not installed")]

CONFIG = """
[engine]
transports = ["udp", "tcp"]

[messaging]
max_bytes = 1024

[accounts.demo.numbers]
"1000" = { module = "baton.hold" }
"8100" = { messaging = "baton.bot" }
"""


def texting_engine(tmp_path) -> EngineProcess:
    path = tmp_path / "texts.toml"
    path.write_text(CONFIG)
    return EngineProcess(str(path), extra=["--no-accountant"]).wait_ready()


@pytest.mark.parametrize("transport", ["u1", "t1"])
def test_bad_message_input_gets_sip_answers(tmp_path, transport):
    with texting_engine(tmp_path) as engine:
        run_sipp(engine, tmp_path, "-s", "8100", scenario="message_bad.xml", calls=2,
                 transport=transport)
        finish_engine(engine)


def test_message_inside_and_outside_a_dialog(tmp_path):
    with texting_engine(tmp_path) as engine:
        run_sipp(engine, tmp_path, "-s", "8100", scenario="message_dialog.xml", calls=3)
        finish_engine(engine)


def test_message_load(tmp_path):
    with texting_engine(tmp_path) as engine:
        r = run_sipp(engine, tmp_path, "-s", "8100", "-r", "100", scenario="message_load.xml",
                     calls=300)
        assert r["messages"].count("SIP/2.0 202") >= 300
        finish_engine(engine)
