"""A Twilio-style IVR written with the real `twilio` library, driven by real peers:
SIPp (DTMF from the sip-tester pcap) and a PJSIP endpoint (RFC 4733), against the
engine run by its own CLI."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys

import pytest

twilio_voice = pytest.importorskip("twilio.twiml.voice_response", reason="twilio is not installed")

from tests.helpers import DEMO, EngineProcess  # noqa: E402
from tests.twiml_apps import AppServer  # noqa: E402

pytestmark = pytest.mark.interop
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SURVEY = os.path.join(ROOT, "tests", "sipp", "e2e", "uac_dtmf_survey.xml")
DTMF_1 = "/usr/share/sip-tester/dtmf_2833_1.pcap"
SECRET = "ivr-test-secret-0123456789"


async def ivr_app() -> AppServer:
    app = AppServer(secret=SECRET)

    def ivr(params, _request):
        vr = twilio_voice.VoiceResponse()
        g = vr.gather(num_digits=1, action=f"{app.url}/pressed", timeout=8)
        g.say("Welcome. Press one.")
        vr.say("We did not get your choice.")
        return vr

    def pressed(params, _request):
        vr = twilio_voice.VoiceResponse()
        vr.say(f"You pressed {params.get('Digits', 'nothing')}. Goodbye.")
        vr.hangup()
        return vr

    app.route("/ivr", ivr)
    app.route("/pressed", pressed)
    return await app.start()


def config_with_ivr(tmp_path, url: str) -> str:
    with open(DEMO) as f:
        text = f.read()
    text = text.replace('api_tokens = ["demo-api-token-change-me-0123456789"]',
                        f'api_tokens = ["demo-api-token-change-me-0123456789"]\n'
                        f'secret = "{SECRET}"\ntwilio_signature = true')
    text = text.replace('"2000" = { app = "support" }',
                        f'"2000" = {{ app = "support" }}\n"4900" = {{ instructions = "{url}/ivr" }}')
    text = text.replace("fetch_allow = []", 'fetch_allow = ["127.0.0.1/32"]')
    path = tmp_path / "ivr.toml"
    path.write_text(text)
    return str(path)


def check(app: AppServer) -> dict:
    pressed = app.got("/pressed")
    assert len(pressed) == 1, [r.path for r in app.requests]
    req = pressed[0]
    assert req.params["Digits"] == "1" and req.params["CallSid"].startswith("S")
    assert req.twilio_valid, "X-Twilio-Signature must validate with twilio's RequestValidator"
    assert req.baton_valid, "X-Baton-Signature must validate"
    return req.params


@pytest.mark.skipif(shutil.which("sipp") is None or not os.path.exists(DTMF_1),
                    reason="SIPp and its DTMF pcaps (Debian sip-tester) are needed")
async def test_sipp_presses_one_in_a_twilio_ivr(tmp_path):
    app = await ivr_app()
    try:
        with EngineProcess(config_with_ivr(tmp_path, app.url)) as eng:
            proc = await asyncio.create_subprocess_exec(
                "sipp", "-sf", SURVEY, f"127.0.0.1:{eng.port}", "-s", "4900", "-m", "1",
                "-i", "127.0.0.1", "-p", "0", "-mp", "0", "-timeout", "40s", "-timeout_error",
                "-trace_err", "-error_file", str(tmp_path / "err.log"), "-max_socket", "100",
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE, cwd=tmp_path)
            _, err = await asyncio.wait_for(proc.communicate(), 60)
            errlog = (tmp_path / "err.log").read_text() if (tmp_path / "err.log").exists() else ""
            assert proc.returncode == 0, f"SIPp failed:\n{err.decode()[-2000:]}\n{errlog[-2000:]}"
            params = check(app)
            assert params["To"].startswith("sip:4900@") or "4900" in params["To"]
            assert eng.stop() == 0
            assert "Traceback" not in eng.output()
    finally:
        await app.stop()


async def test_pjsip_presses_one_in_a_twilio_ivr(tmp_path):
    pytest.importorskip("pjsua2", reason="pjsua2 is not installed")
    app = await ivr_app()
    try:
        with EngineProcess(config_with_ivr(tmp_path, app.url)) as eng:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, os.path.join(ROOT, "tests", "pjsip_media.py"), "dtmf",
                "--engine", f"127.0.0.1:{eng.port}", "--number", "4900", "--key", "1",
                "--before", "2.0", "--after", "1.0", "--log", str(tmp_path / "pjsip.log"),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT)
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            lines = [ln for ln in out.decode().splitlines() if ln.startswith("RESULT ")]
            assert lines, f"no result from the PJSIP peer:\n{err.decode()[-3000:]}"
            result = json.loads(lines[-1][len("RESULT "):])
            assert "error" not in result, result
            await app.wait_for("/pressed", 1, timeout=5)
            check(app)
            assert eng.stop() == 0
            assert "Traceback" not in eng.output()
    finally:
        await app.stop()
