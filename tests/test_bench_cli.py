"""`baton bench`: scenarios run through the command, result files, repeats, usage errors."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from engine.cli import bench as bench_cli
from tests.helpers import BATON

pytestmark = pytest.mark.kernels_only

FIGURE_FIELDS = {"label", "unit", "median", "min", "max", "values", "higher_is_better"}


def bench(*args, timeout=120):
    return subprocess.run([BATON, "bench", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def assert_valid_png(path: Path) -> None:
    """The PNG signature, then well-formed chunks with correct CRCs up to IEND."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, kinds = 8, []
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        kinds.append(kind)
        pos += 12 + length
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100


def result_of(proc: subprocess.CompletedProcess, results: Path) -> dict:
    assert proc.returncode == 0, proc.stderr
    files = sorted(results.glob("*.json"))
    assert len(files) == 1, files
    record = json.loads(files[0].read_text())
    assert record["json"] == str(files[0])
    assert_valid_png(Path(record["png"]))
    assert Path(record["png"]).parent == results
    return record


def test_ring_quick_writes_json_and_png(tmp_path):
    r = bench("ring", "--quick", "--results-dir", str(tmp_path))
    record = result_of(r, tmp_path)
    assert record["scenario"] == "ring" and record["driver"] == "bench/ring_bench.py"
    assert record["repeat"] == 1 and record["completed"] == 1 and record["quick"] is True
    assert record["errors"] == []
    assert {"cpus", "cpu_model", "kernel", "python", "loadavg", "started", "command"} \
        <= set(record["meta"])
    fig = record["figures"]["end_to_end"]
    assert FIGURE_FIELDS <= set(fig) and fig["unit"] == "records/s"
    assert fig["median"] == fig["min"] == fig["max"] > 0 and len(fig["values"]) == 1
    # The Python twin ran in the same command and is the baseline.
    assert fig["baseline"]["label"] == "Python twin" and fig["baseline"]["median"] > 0
    assert fig["ratio"]["median"] > 0
    run = record["runs"][0]
    assert run["returncode"] == 0 and run["result"]["results"]["c"]["records"] == 50000
    # Not a terminal: plain progress lines, and the summary on stdout.
    assert "bench ring: 100%" in r.stderr and "\x1b[" not in r.stderr
    assert "records/s written and drained" in r.stdout and record["json"] in r.stdout
    assert "--quick: a smoke run" in r.stdout


@pytest.mark.interop
@pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp is not installed")
def test_accountant_lag_quick_measures_every_call(tmp_path):
    r = bench("accountant-lag", "--quick", "--results-dir", str(tmp_path), timeout=180)
    record = result_of(r, tmp_path)
    run = record["runs"][0]["result"]
    # Every call of both phases became one ledger transaction, and none lagged below 0
    # (the closing stamp's wall time is derived right).
    for phase in ("idle", "load"):
        calls = run[phase]
        assert calls["failed"] == 0 and calls["transactions"] == calls["successful"] > 0
        assert 0 <= calls["lag_min_ms"] <= calls["lag_p50_ms"] <= calls["lag_p99_ms"]
    p99 = record["figures"]["p99"]
    assert p99["median"] > 0 and p99["baseline"]["label"] == "idle 10 CPS"
    assert p99["baseline"]["median"] > 0
    assert record["figures"]["accountant_cpu"]["median"] > 0


def test_rest_quick_places_and_answers_every_call(tmp_path):
    r = bench("rest", "--quick", "--results-dir", str(tmp_path), timeout=180)
    record = result_of(r, tmp_path)
    run = record["runs"][0]["result"]
    # Every call created through the REST API was answered before the GETs ran.
    assert run["calls"] == run["answered"] == 20 and run["requests"] == 200
    assert record["figures"]["creations"]["median"] > 0
    p99 = record["figures"]["get_p99"]
    assert p99["median"] >= record["figures"]["get_p50"]["median"] > 0
    assert p99["baseline"]["label"] == "aiohttp static JSON" and p99["baseline"]["median"] > 0


def test_repeat_reports_median_min_max(tmp_path):
    r = bench("mixer", "--quick", "--repeat", "2", "--results-dir", str(tmp_path), "--json")
    record = result_of(r, tmp_path)
    assert json.loads(r.stdout.strip().splitlines()[-1])["json"] == record["json"]
    assert record["repeat"] == 2 and len(record["runs"]) == 2
    fig = record["figures"]["participants"]
    assert len(fig["values"]) == 2
    assert fig["min"] == min(fig["values"]) and fig["max"] == max(fig["values"])
    assert fig["min"] <= fig["median"] <= fig["max"]
    # The numpy twin is run beside each repetition.
    assert len(fig["baseline"]["values"]) == 2
    assert all(run["reference"]["implementation"] == "py" for run in record["runs"])
    assert set(fig["ratio"]) == {"median", "min", "max"}


def test_driver_options_after_double_dash(tmp_path):
    r = bench("ring", "--results-dir", str(tmp_path), "--", "--impl", "py", "--records", "2000")
    record = result_of(r, tmp_path)
    run = record["runs"][0]["result"]
    assert set(run["results"]) == {"py"} and run["results"]["py"]["records"] == 2000
    assert record["figures"]["end_to_end"]["median"] is None
    assert record["figures"]["end_to_end"]["baseline"]["median"] > 0


def test_unknown_scenario_names_the_known_ones(tmp_path):
    r = bench("warp-speed", "--results-dir", str(tmp_path))
    assert r.returncode == 2
    assert "unknown scenario 'warp-speed'" in r.stderr
    for name in bench_cli.SCENARIOS:
        assert name in r.stderr
    assert list(tmp_path.iterdir()) == []
    r = bench()
    assert r.returncode == 2 and "cps-ramp" in r.stderr


def test_usage_errors():
    r = bench("ring", "--engine", "127.0.0.1:5060")
    assert r.returncode == 2 and "--engine applies to cps-ramp only" in r.stderr
    r = bench("cps-ramp", "--engine", "127.0.0.1:99999")
    assert r.returncode == 2 and "--engine" in r.stderr
    r = bench("ring", "--repeat", "0")
    assert r.returncode == 2 and "--repeat" in r.stderr


def test_list_describes_every_scenario():
    r = bench("--list")
    assert r.returncode == 0
    for name, scenario in bench_cli.SCENARIOS.items():
        assert f"{name}  (bench/{scenario.driver}" in r.stdout
        assert (Path(bench_cli.BENCH_DIR) / scenario.driver).is_file()
    assert r.stdout.count("baseline:") == len(bench_cli.SCENARIOS)
    assert "Kamailio" in r.stdout and "relay.c" in r.stdout
    r = bench("--help")
    assert r.returncode == 0 and "--repeat" in r.stdout and "--engine" in r.stdout


def test_scenarios_map_to_driver_json():
    """Every figure's path names a key its driver prints (checked against the source)."""
    for scenario in bench_cli.SCENARIOS.values():
        source = (Path(bench_cli.BENCH_DIR) / scenario.driver).read_text()
        for fig in scenario.figures:
            for path in filter(None, (fig.path, fig.baseline)):
                leaf = path.split(".")[-1]
                assert leaf in source or leaf.split("_", 1)[1] in source, (scenario.name, path)


SIPP_AND_KAMAILIO = pytest.mark.skipif(
    shutil.which("sipp") is None or shutil.which("kamailio", path="/usr/sbin:/usr/bin") is None,
    reason="sipp or kamailio is not installed")


@pytest.mark.interop
@SIPP_AND_KAMAILIO
def test_cps_ramp_quick_ramps_then_offers_past_the_knee(tmp_path):
    r = bench("cps-ramp", "--quick", "--results-dir", str(tmp_path), timeout=240)
    record = result_of(r, tmp_path)
    result = record["runs"][0]["result"]
    ramp = result["ramp"]
    # 100 and 200 calls/s, the ramp's end without a failure here, then 1.5x, 2x and 3x.
    assert ramp["knee_offered"] == 200
    assert sorted({s["offered_rate"] for s in result["steps"]}) == [100, 200, 300, 400, 600]
    for server in ("baton", "kamailio"):
        assert {"at_1_5x", "at_2x", "at_3x"} <= set(ramp[server])
        assert ramp[server]["at_2x"]["offered"] == 400
        assert all(s.get("cpu_us_per_call") for s in result["steps"] if s["server"] == server)


@pytest.mark.interop
@pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp is not installed")
def test_capacity_quick_holds_calls_and_measures_memory(tmp_path):
    r = bench("capacity", "--quick", "--results-dir", str(tmp_path), timeout=180)
    record = result_of(r, tmp_path)
    result = record["runs"][0]["result"]
    assert result["idle"]["calls"] == 200 and result["idle"]["held"] == 200
    assert result["idle"]["under_2gb"] and result["idle_kb_per_session"] > 0
    media = result["media"][0]
    # All 20 were up at once (the bench saw 20 dialogs), and media flowed while they were.
    assert media["calls"] == 20 and media["all_up"] and media["rtp_expected"] > 0
    assert 0 < media["held"] <= 20


@pytest.mark.interop
@SIPP_AND_KAMAILIO
def test_messages_quick_every_text_gets_its_202_and_its_reply(tmp_path):
    r = bench("messages", "--quick", "--results-dir", str(tmp_path), timeout=180)
    record = result_of(r, tmp_path)
    result = record["runs"][0]["result"]
    steps = result["steps"]
    assert result["errors"] == [] and result["senders"] == 20
    for name in ("module", "instructions"):
        # Each text the client sent was accepted (202) and answered by a reply MESSAGE
        # carrying its own token: the bot's echo, the app's <Message>{Body}</Message>.
        assert steps[name] and steps[name][0]["offered_rate"] == 50
        for step in steps[name]:
            assert step["sent"] == step["accepted"] == step["replied"] > 0, (name, step)
            assert step["refused"] == 0
            assert 0 < step["reply_p50_ms"] <= step["reply_p99_ms"]
    # Kamailio answered the same stream, and SIPp's, with 202 statelessly.
    for name in ("kamailio", "kamailio_sipp"):
        assert steps[name] and all(s["sent"] == s["accepted"] > 0 for s in steps[name])
    figures = record["figures"]
    assert figures["module_rate"]["median"] > 0 and figures["instructions_rate"]["median"] > 0
    assert figures["module_rate"]["baseline"]["label"] == "Kamailio stateless (SIPp, 202)"
    assert figures["module_p99"]["baseline"]["median"] > 0


def test_load_quick_sets_baton_load_beside_sipp(tmp_path):
    r = bench("load", "--quick", "--results-dir", str(tmp_path), timeout=240)
    record = result_of(r, tmp_path)
    result = record["runs"][0]["result"]
    assert result["errors"] == []
    steps = result["signalling"]["steps"]
    # Both generators offered 50 and 100 calls/s to the same Kamailio in the same run.
    for gen in ("baton", "sipp"):
        mine = [s for s in steps if s["generator"] == gen]
        assert [s["offered_rate"] for s in mine][:1] == [50]
        assert all(s["cpu_us_per_call"] > 0 for s in mine)
        assert mine[0]["answered"] == mine[0]["calls"] == 75
    # Kamailio answers without SDP: baton load says there was no audio, not that it failed.
    assert all(s["audio"] == {"none": s["calls"]} for s in steps if s["generator"] == "baton")
    levels = result["media"]["levels"]
    assert [(x["generator"], x["calls"]) for x in levels] == [("sipp", 10), ("baton", 10)]
    sipp, baton = levels
    assert sipp["engine_rx_expected"] > 0 and sipp["return_loss_pct"] is None
    # What SIPp cannot tell: baton load measured the echo it got back, and rated it.
    assert baton["engine_rx_expected"] > 0 and baton["return_loss_pct"] is not None
    assert baton["echo_passed"] >= 1 and baton["mos_mean"] > 1
    assert baton["cpu_us_per_call"] > 0 and sipp["cpu_us_per_call"] > 0
    # baresip's echo module as the media target: baton load alone, echo checked and rated.
    if shutil.which("baresip") and os.path.exists("/usr/lib/baresip/modules/echo.so"):
        (level,) = result["baresip"]["levels"]
        assert level["calls"] == 10 and level["codes"] == {"200": 10}, level
        assert level["return_loss_pct"] is not None and level["echo_checked"] == 10
        assert level["echo_passed"] >= 1 and level["mos_mean"] > 1
        assert result["baton_baresip_calls"] == (10 if level["ok"] else None)
    figs = record["figures"]
    assert figs["cps"]["baseline"]["label"] == "SIPp uac"
    assert figs["media_cpu"]["higher_is_better"] is False
