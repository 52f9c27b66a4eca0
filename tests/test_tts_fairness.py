"""One tenant cannot hold every espeak-ng slot: with two slots, a flood of one
account's renderings leaves the other slot to everyone else (docs/security.md).
espeak-ng is replaced by a stand-in that sleeps, so the order is certain."""
from __future__ import annotations

import asyncio
import stat
import sys

from engine.media.tts import SpeechCache

FAKE_ESPEAK = """#!{python}
import sys, time, wave
args = sys.argv[1:]
out = args[args.index("-w") + 1]
text = sys.stdin.read()
with open({log!r}, "a") as f:
    f.write(f"start {{text}} {{time.monotonic()}}\\n")
time.sleep(0.4 if text.startswith("flood") else 0.0)
with wave.open(out, "wb") as w:
    w.setnchannels(1); w.setsampwidth(2); w.setframerate(22050)
    w.writeframes(b"\\x00\\x01" * 2205)
"""


async def test_one_tenant_holds_at_most_one_of_two_slots(tmp_path):
    log = tmp_path / "starts.log"
    fake = tmp_path / "espeak-ng"
    fake.write_text(FAKE_ESPEAK.format(python=sys.executable, log=str(log)))
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    cache = SpeechCache(tmp_path / "tts", max_concurrent=2, espeak=str(fake))
    assert cache.per_tenant == 1
    flood = [asyncio.ensure_future(cache.say(f"flood {i}", tenant="mallory")) for i in range(4)]
    await asyncio.sleep(0.1)
    pcm = await cache.say("your code is 4 8 2 1", tenant="acme")
    await asyncio.gather(*flood)
    assert len(pcm) > 0
    starts = [ln.split()[1] for ln in log.read_text().splitlines()]
    # acme's rendering started before mallory's second one could: mallory never held
    # both slots (with one shared pool, two of the flood would start first).
    assert starts.index("your") <= 1, starts
