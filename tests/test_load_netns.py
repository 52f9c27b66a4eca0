"""`baton load` measures what was done to the media: inside a network namespace the test
creates, nftables drops a known share of the RTP coming back to the generator, and the
measured loss, the MOS and the DTMF round trip must agree with what was injected."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from engine.load import emodel
from tests.helpers import BATON, DEMO, EngineProcess
from tests.netns import Netns, NetnsUnavailable

pytestmark = pytest.mark.netns

GEN_RTP = (50000, 50999)       # the generator's RTP ports; the demo engine uses 20000-29999


@pytest.fixture(scope="module")
def ns():
    if shutil.which("nft") is None:
        pytest.skip("nftables (`nft`) is not installed: make setup")
    try:
        netns = Netns("baton-load").create()
    except NetnsUnavailable as exc:
        pytest.skip(str(exc))
    engine = None
    try:
        engine = EngineProcess(DEMO, netns=netns.name)
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


@pytest.mark.parametrize("percent", [0, 5])
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
    # Binomial: sigma = sqrt(p(1-p)/n) ~ 0.16 pp at 5 % over 18,000 packets.
    assert abs(rtp["loss_pct"] - percent) <= 0.5, rtp
    assert rtp["duplicate"] == 0
    predicted = emodel.mos(emodel.r_factor(percent, emodel.mouth_to_ear(0, 0)))
    assert s["quality"]["mos"]["mean"] == pytest.approx(predicted, abs=0.1)
    if percent:
        assert s["quality"]["mos"]["mean"] < emodel.mos(emodel.r_factor(1, 20))


def test_dtmf_sequences_are_all_detected_on_a_clean_path(ns, tmp_path):
    drop_rtp(ns, 0)
    s = run_load(ns, tmp_path, "--rate", "10", "--calls", "20", "--hold", "1",
                 "--scenario", "dtmf-roundtrip")
    assert s["dtmf"] == {"sent": 240, "detected": 240, "detected_pct": 100.0}
