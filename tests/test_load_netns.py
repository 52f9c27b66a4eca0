"""`baton load` measures what was done to the media: inside a network namespace the test
creates, nftables drops a known share of the RTP coming back to the generator, and the
measured loss, the MOS and the DTMF round trip must agree with what was injected; an
impairment relay (tests/load_relay.py) on the media path adds known delay and jitter."""
from __future__ import annotations

import csv
import json
import shutil
import signal
import statistics
import subprocess
import sys

import pytest

from engine.load import emodel
from tests.helpers import BATON, DEMO, ROOT, EngineProcess
from tests.netns import Netns, NetnsUnavailable

pytestmark = pytest.mark.netns

GEN_RTP = (50000, 50999)       # the generator's RTP ports
ENGINE_RTP = (20000, 20399)    # the engine's: few, so the relay can bind every one
RELAY_HOST = "127.0.0.2"       # the relay's side of lo (all of 127/8 is lo's)


@pytest.fixture(scope="module")
def ns(tmp_path_factory):
    if shutil.which("nft") is None:
        pytest.skip("nftables (`nft`) is not installed: make setup")
    try:
        netns = Netns("baton-load").create()
    except NetnsUnavailable as exc:
        pytest.skip(str(exc))
    engine = None
    try:
        config = tmp_path_factory.mktemp("load-netns") / "demo.toml"
        config.write_text(open(DEMO).read().replace(
            "rtp_port_max = 29999", f"rtp_port_max = {ENGINE_RTP[1]}"))
        engine = EngineProcess(str(config), netns=netns.name)
        engine.wait_ready()
        netns.engine = engine
        yield netns
    finally:
        if engine is not None:
            engine.stop()
        netns.destroy()


def drop_rtp(ns: Netns, percent: int) -> None:
    """Drop `percent` % of the UDP datagrams to the generator's RTP ports, at random."""
    ns.run(["nft", "delete", "table", "inet", "impair"], capture_output=True)
    if percent == 0:
        return
    for rule in (["add", "table", "inet", "impair"],
                 ["add", "chain", "inet", "impair", "input",
                  "{ type filter hook input priority 0 ; }"],
                 ["add", "rule", "inet", "impair", "input", "udp", "dport",
                  f"{GEN_RTP[0]}-{GEN_RTP[1]}", "numgen", "random", "mod", "100", "<",
                  str(percent), "drop"]):
        ns.run(["nft", *rule], check=True, capture_output=True)


def run_load(ns: Netns, tmp_path, *args) -> dict:
    cmd = [BATON, "load", f"127.0.0.1:{ns.engine.port}", "--number", "1001", "--quiet",
           "--rtp-ports", f"{GEN_RTP[0]}-{GEN_RTP[1]}", "--report", str(tmp_path), *args]
    r = ns.run(cmd, capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr
    return json.loads((tmp_path / "summary.json").read_text())


@pytest.mark.parametrize("percent", [0, 1, 5])
def test_measured_loss_and_mos_match_what_was_dropped(ns, tmp_path, percent):
    drop_rtp(ns, percent)
    try:
        # 50 calls of 8 s: about 20,000 RTP packets back from the echo.
        s = run_load(ns, tmp_path, "--rate", "25", "--calls", "50", "--hold", "8",
                     "--scenario", "answer-hold")
    finally:
        drop_rtp(ns, 0)
    assert s["calls"]["codes"] == {"200": 50}
    rtp = s["rtp"]
    assert rtp["expected"] >= 18_000
    # Binomial: sigma = sqrt(p(1-p)/n) ~ 0.16 pp at 5 %, 0.07 pp at 1 % over 18,000 packets.
    assert abs(rtp["loss_pct"] - percent) <= 0.5, rtp
    assert rtp["duplicate"] == 0
    predicted = emodel.mos(emodel.r_factor(percent, emodel.mouth_to_ear(0, 0)))
    assert s["quality"]["mos"]["mean"] == pytest.approx(predicted, abs=0.1)
    if percent:
        assert s["quality"]["mos"]["mean"] < emodel.mos(emodel.r_factor(percent / 2, 20))


def test_dtmf_sequences_are_all_detected_on_a_clean_path(ns, tmp_path):
    drop_rtp(ns, 0)
    s = run_load(ns, tmp_path, "--rate", "10", "--calls", "20", "--hold", "1",
                 "--scenario", "dtmf-roundtrip")
    assert s["dtmf"] == {"sent": 240, "detected": 240, "detected_pct": 100.0}


class Relay:
    """tests/load_relay.py inside the namespace, between `baton load` and the engine."""

    def __init__(self, ns: Netns, tmp_path, delay_ms: float, jitter_ms: float):
        self.report = tmp_path / "relay.json"
        self.proc = subprocess.Popen(
            ns.cmd([sys.executable, "-m", "tests.load_relay", RELAY_HOST, "127.0.0.1",
                    f"{ENGINE_RTP[0]}-{ENGINE_RTP[1]}", str(delay_ms), str(jitter_ms), "3550",
                    str(self.report)]),
            cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def injected(self) -> list:
        """Stop; the RFC 3550 jitter of every stream the relay sent to the generator."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)
        return json.loads(self.report.read_text())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_through_relay(ns, tmp_path, delay_ms: float, jitter_ms: float):
    relay = Relay(ns, tmp_path, delay_ms, jitter_ms)
    try:
        s = run_load(ns, tmp_path, "--media-to", RELAY_HOST, "--rate", "8", "--calls", "8",
                     "--hold", "4", "--scenario", "echo-check")
        injected = relay.injected()
    finally:
        relay.kill()
    assert s["calls"]["codes"] == {"200": 8}
    # Jitter over 20 ms reorders packets, and the echo plays them back in that order: a
    # probe heard so scrambled may fall under the correlation threshold; a clean one not.
    passed = 8 if jitter_ms < 20 else 6
    assert s["echo"]["checked"] == 8 and s["echo"]["passed"] >= passed, \
        [r["echo_correlation"] for r in csv.DictReader(open(tmp_path / "calls.csv"))]
    assert s["rtp"]["loss_pct"] == 0.0
    return s, injected


@pytest.mark.parametrize("delay_ms,jitter_ms", [(0, 0), (50, 0), (200, 0), (50, 40)])
def test_measured_delay_and_jitter_match_the_relay(ns, tmp_path, delay_ms, jitter_ms):
    """The relay holds each packet `delay_ms` each way, plus U(0, jitter_ms) on the way
    back. Stated tolerances: one-way delay (half the echo's round trip) within
    [D, D + 20 + W] ms per call (the two media clocks round the round trip up to their
    20 ms ticks); the mean RFC 3550 jitter within 3 ms of the jitter the relay really
    put on what it sent; the mean MOS within 0.05 of the E-model's for the delays that
    band allows."""
    drop_rtp(ns, 0)
    s, injected = run_through_relay(ns, tmp_path, delay_ms, jitter_ms)
    rows = list(csv.DictReader(open(tmp_path / "calls.csv")))
    delays = [float(r["delay_ms"]) for r in rows if r["delay_ms"]]
    assert all(delay_ms <= d <= delay_ms + 20 + jitter_ms for d in delays), delays
    jitter = statistics.mean(float(r["jitter_ms"]) for r in rows)
    put_on = statistics.mean(i["jitter_ms"] for i in injected)
    assert len(injected) == 8 and all(i["packets"] > 150 for i in injected)
    assert abs(jitter - put_on) <= 3.0, (jitter, injected)
    if jitter_ms:
        # Independent U(0, W) holds: E|X - Y| = W / 3 (a relay that held nothing fails).
        assert put_on == pytest.approx(jitter_ms / 3, abs=4.0)
    # Mean one-way delay injected: D forward, D + W/2 back. The measured delay may sit
    # anywhere in the stated band above it (the clocks' rounding), so the MOS must lie
    # between the E-model's at the band's two ends, within 0.05.
    predicted = emodel.mos(emodel.r_factor(0, emodel.mouth_to_ear(delay_ms + jitter_ms / 4,
                                                                  put_on)))
    worst = emodel.mos(emodel.r_factor(0, emodel.mouth_to_ear(delay_ms + 20 + jitter_ms,
                                                              put_on)))
    assert worst - 0.05 <= s["quality"]["mos"]["mean"] <= predicted + 0.05, (worst, predicted)
    clean = emodel.mos(emodel.r_factor(0, emodel.mouth_to_ear(0, 0)))
    if delay_ms:
        assert s["quality"]["mos"]["mean"] < clean - (clean - predicted) / 2
