"""Issue 15, tenants' and vendors' files: recordings are per account under random
names; one tenant's document cannot play another's recording, nor widen its
directories through a Redirect's `sounds_dir`; a vendor plays its own
directory only; "missing" and "not allowed" are one answer."""
from __future__ import annotations

import asyncio
import os
import re

import pytest

pytest.importorskip("ext.rtp", reason="ext.rtp is not built (make build)")

from tests.helpers import engine_config, running_engine  # noqa: E402
from tests.test_sessions import Caller  # noqa: E402
from tests.twiml_apps import AppServer, Events, instructions_engine, tone_payload  # noqa: E402
from tests.vendor_procs.harness import SECRET_A, control_config, target, wait_until  # noqa: E402

from control.sdk import NotFound, VendorClient  # noqa: E402

REC = re.compile(r"RE[0-9a-f]{32}\.wav")


def two_tenants(url: str) -> dict:
    raw = engine_config()
    raw["accounts"]["demo"]["numbers"]["4000"] = {"instructions": url + "/record"}
    raw["accounts"]["beta"] = {"numbers": {"4100": {"instructions": url + "/steal"},
                                           "4101": {"instructions": url + "/missing"},
                                           "4102": {"instructions": url + "/widen"}}}
    return raw


async def play_errors(eng, events, number: str) -> list:
    caller = Caller(eng, number)
    await caller.dial()
    await caller.talk(0.3)
    # The document hangs up after its <Play>.
    await wait_until(lambda: any(s.number == number for s in eng.finished))
    caller.close()
    sid = [s for s in eng.finished if s.number == number][-1].id
    return [e for e in events.of("error", sid) if e.get("verb") == "Play"]


async def test_recordings_are_per_account_random_and_closed_to_other_tenants():
    app = AppServer()
    app.twiml("/record", "<Response><Record action='/done' playBeep='false' timeout='0'/>"
                         "</Response>")
    app.twiml("/done", "<Response><Hangup/></Response>")
    await app.start()
    stolen: dict = {}
    app.route("/steal", lambda _p, _r: f"<Response><Play>file://{stolen['path']}</Play>"
                                       "<Hangup/></Response>")
    app.route("/missing", lambda _p, _r: "<Response><Play>file://" + os.path.join(
        stolen["dir"], "RE" + "0" * 32 + ".wav") + "</Play><Hangup/></Response>")
    # A Redirect that tries to widen the readable directories to the whole tree.
    app.route("/widen", lambda _p, _r: "<Response><Redirect>module:baton.instructions?url="
                                       + app.url + "/widened&amp;sounds_dir=/</Redirect>"
                                       "</Response>")
    app.route("/widened", lambda _p, _r: f"<Response><Play>file://{stolen['path']}</Play>"
                                         "<Hangup/></Response>")
    async with instructions_engine(two_tenants(app.url)) as eng:
        events = Events(eng)
        caller = Caller(eng, "4000")
        await caller.dial()
        for n in range(30):
            await caller.talk(0.02, tone_payload(500, n))
        await caller.bye()
        caller.close()
        done = (await app.wait_for("/done"))[0].params
        recs = os.path.join(eng.cfg.data_dir, "recordings")
        assert os.listdir(recs) == ["demo"], "each account has its own directory"
        names = os.listdir(os.path.join(recs, "demo"))
        assert len(names) == 1 and REC.fullmatch(names[0]), names
        assert names[0] == done["RecordingSid"] + ".wav"
        stolen["dir"] = os.path.join(recs, "demo")
        stolen["path"] = os.path.join(recs, "demo", names[0])

        steal = await play_errors(eng, events, "4100")
        missing = await play_errors(eng, events, "4101")
        widened = await play_errors(eng, events, "4102")
        assert steal and missing and widened, (steal, missing, widened)

        def answer(errs: list) -> tuple:
            e = errs[0]
            return e["code"], e["reason"].rsplit(": ", 1)[1]
        assert answer(steal) == answer(missing) == answer(widened)
        assert answer(steal)[1] == "no such audio file"
    await app.stop()


async def test_record_module_names_are_random_per_account():
    raw = engine_config()
    raw["accounts"]["demo"]["numbers"]["4200"] = {"module": "baton.record", "beep": False,
                                                  "silence": 0, "max_length": 1}
    async with running_engine(raw) as eng:
        names = []
        for _ in range(2):
            caller = Caller(eng, "4200")
            await caller.dial()
            await caller.talk(1.3, tone_payload(500, 0))
            # max_length reached: `done` is not wired, so the call ends.
            caller.close()
        d = os.path.join(eng.cfg.data_dir, "recordings", "demo")
        await wait_until(lambda: len(os.listdir(d)) == 2)
        names = sorted(os.listdir(d))
        assert all(REC.fullmatch(n) for n in names) and names[0] != names[1]
        assert not any(s.id in n for s in eng.finished for n in names), "no session ids"


async def test_vendor_plays_only_its_directory_and_cannot_probe_files(tmp_path):
    raw = control_config()
    own = tmp_path / "acme"
    own.mkdir()
    raw["vendors"]["acme"]["files_dir"] = str(own)
    async with running_engine(raw) as eng:
        v = VendorClient(target(eng), "acme.survey", SECRET_A)
        calls: list = []

        @v.on_offer
        async def on(offer):
            calls.append(await offer.take())

        await v.start()
        caller = Caller(eng, "4000")
        dial = asyncio.ensure_future(caller.dial())
        await wait_until(lambda: calls)
        call = calls[0]
        await call.answer()
        await dial
        answers = []
        for path in ("/etc/passwd", "/nonexistent/x.wav", str(own / "missing.wav"),
                     str(own / ".." / ".." / "etc" / "passwd"), eng.cfg.data_dir + "/ledger.db"):
            with pytest.raises(NotFound) as err:
                await call.play(path)
            answers.append((type(err.value), err.value.field, str(err.value)))
        assert len(set(answers)) == 1, answers
        assert "passwd" not in answers[0][2]
        await caller.bye()
        caller.close()
        await v.close()
