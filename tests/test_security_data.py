"""Issue 15, tenants' files and the engine's stored data: recordings are per
account under random names; one tenant's document cannot play another's
recording, nor widen its directories through a Redirect's `sounds_dir`;
"missing" and "not allowed" are one answer (a vendor's side:
tests/test_control_media.py); the data directory is private and the webhook
outbox keeps no key; the accountant's socket is never abstract."""
from __future__ import annotations

import os
import re

import pytest

pytest.importorskip("ext.rtp", reason="ext.rtp is not built (make build)")

from tests.helpers import engine_config, running_engine  # noqa: E402
from tests.test_sessions import Caller  # noqa: E402
from tests.twiml_apps import AppServer, Events, instructions_engine, tone_payload  # noqa: E402
from tests.vendor_procs.harness import wait_until  # noqa: E402

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


# -- stored data private to the engine's user ------------------------------------------

ACCOUNT_KEY = "acct-whsec-0123456789abcdef"
GLOBAL_KEY = "global-whsec-0123456789abcdef"


class _Addr:
    def __init__(self, port: int):
        self.sip_port = port


async def test_data_dir_is_private_and_outbox_keeps_no_secret(tmp_path):
    import shutil
    import stat

    from tests.helpers import EngineProcess
    from tests.test_webhooks import Receiver

    rx = await Receiver(fail=1000, secret=ACCOUNT_KEY).start()   # keep rows in the outbox
    d = tmp_path / "d"
    cfg = tmp_path / "baton.toml"
    cfg.write_text(f"""
[engine]
transports = ["udp"]
[media]
address = "127.0.0.1"
[webhooks]
url = "http://127.0.0.1:9/unused"
secret = "{GLOBAL_KEY}"
retry_base = 30
[accounts.demo]
webhook_url = "{rx.url}"
webhook_secret = "{ACCOUNT_KEY}"
[accounts.demo.numbers]
"4200" = {{ module = "baton.record", beep = false, silence = 0, max_length = 1 }}
""")
    eng = EngineProcess(str(cfg))
    data = eng.data_dir
    try:
        os.chmod(data, 0o755)           # a data directory an operator made by hand
        eng.wait_ready()
        caller = Caller(_Addr(eng.port), "4200")
        await caller.dial()
        await caller.talk(1.3, tone_payload(500, 0))
        caller.close()
        # Signed with the account's own key; failing, so the rows stay in the outbox.
        await wait_until(lambda: len({a["id"] for a in rx.attempts if a["verified"]}) >= 2,
                         timeout=15)
        recs = os.path.join(data, "recordings", "demo")
        await wait_until(lambda: os.path.isdir(recs) and os.listdir(recs), timeout=10)
        await wait_until(lambda: os.path.exists(os.path.join(data, "accounting", "ledger.db")),
                         timeout=15)
        open_to_others = []
        for root, dirs, files in os.walk(data):
            for name in [root, *(os.path.join(root, f) for f in dirs + files)]:
                mode = os.lstat(name).st_mode
                if not stat.S_ISLNK(mode) and mode & 0o077:
                    open_to_others.append((os.path.relpath(name, data), oct(mode & 0o777)))
        assert open_to_others == [], open_to_others
        outbox = [os.path.join(data, "webhooks", f) for f in os.listdir(
            os.path.join(data, "webhooks")) if f.startswith("engine.db")]
        assert any(f.endswith(".db") for f in outbox), outbox
        for f in outbox:
            blob = open(f, "rb").read()
            assert ACCOUNT_KEY.encode() not in blob and GLOBAL_KEY.encode() not in blob, f
        assert eng.stop(timeout=15) == 0
    finally:
        if eng.proc.poll() is None:
            eng.proc.kill()
            eng.proc.wait()
        await rx.stop()
        shutil.rmtree(data, ignore_errors=True)


def test_accountant_socket_is_never_abstract_and_its_directory_is_private(tmp_path):
    from engine.accounting.service import billing_address
    from engine.common.guard import private_dir

    long_dir = tmp_path / ("d" * 120)
    addr = billing_address(str(long_dir))
    assert addr.startswith("unix:/") and "abstract" not in addr, addr
    sock_dir = os.path.dirname(addr[len("unix:"):])
    assert os.path.basename(sock_dir) == f"baton-{os.getuid()}"
    assert len(addr) - len("unix:") <= 100
    # A directory someone else made cannot be taken over; a too-open one is closed.
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o755)
    os.chmod(mine, 0o755)
    private_dir(str(mine))
    assert os.stat(mine).st_mode & 0o777 == 0o700
    if os.getuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir()
        os.chown(theirs, 65534, 65534)
        with pytest.raises(OSError):
            private_dir(str(theirs))
