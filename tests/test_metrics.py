"""Prometheus /metrics of the engine and of the accountant: a real `baton serve` with
metrics_addr, calls placed over loopback, the text scraped over HTTP and parsed with
prometheus_client's own parser."""
from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import tempfile
import types

import pytest

pytest.importorskip("ext.rtp", reason="ext.rtp is not built (make build)")

import aiohttp  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from engine.config.load import ConfigError, from_dict  # noqa: E402
from tests.helpers import BATON, DEMO, EngineProcess, engine_config, running_engine  # noqa: E402
from tests.test_sessions import rtp_packet  # noqa: E402
from tests.test_sessions import Caller  # noqa: E402

URL = re.compile(r"http://127\.0\.0\.1:\d+/metrics")


async def scrape(url: str) -> dict:
    """{sample name: {frozenset(labels): value}} of one scrape."""
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
    out: dict = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


def value(m: dict, name: str, **labels) -> float:
    """The sum of the series of `name` that carry `labels` (0 when there are none)."""
    want = set(labels.items())
    return sum(v for k, v in m.get(name, {}).items() if want <= k)


async def until(url: str, check, timeout: float = 10.0) -> dict:
    """Scrape until `check(metrics)` holds (the engine and accountant work asynchronously)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        m = await scrape(url)
        if check(m) or loop.time() > deadline:
            return m
        await asyncio.sleep(0.1)


def demo_with(**engine_keys) -> str:
    """The demo config with extra [engine] keys, in a temporary file."""
    with open(DEMO) as f:
        text = f.read()
    extra = "".join(f'{k} = "{v}"\n' for k, v in engine_keys.items())
    text = text.replace("[engine]\n", "[engine]\n" + extra, 1)
    fd, path = tempfile.mkstemp(prefix="baton-metrics-", suffix=".toml")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


async def wait_for_url(path_or_proc, timeout: float = 15.0) -> str:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if isinstance(path_or_proc, EngineProcess):
            text = path_or_proc.output()
        else:
            try:
                with open(path_or_proc, errors="replace") as f:
                    text = f.read()
            except FileNotFoundError:
                text = ""
        m = URL.search(text)
        if m:
            return m.group(0)
        assert loop.time() < deadline, f"no metrics URL after {timeout}s:\n{text}"
        await asyncio.sleep(0.1)


async def test_engine_and_accountant_metrics_follow_calls():
    config = demo_with(accountant_metrics_addr="127.0.0.1:0")
    engine = EngineProcess(config=config, extra=["--metrics-addr", "127.0.0.1:0"])
    try:
        engine.wait_ready()
        url = await wait_for_url(engine)
        acct_url = await wait_for_url(os.path.join(engine.data_dir, "accountant.log"))
        before = await scrape(url)
        assert value(before, "baton_engine_info") == 1
        assert value(before, "baton_sessions_started_total") == 0
        assert value(before, "baton_ring_slots") > 0
        # `baton serve` collects once after start-up: the hook saw that full collection.
        assert value(before, "baton_gc_pause_seconds_count", generation="2") >= 1
        assert value(before, "baton_gc_pause_seconds_sum", generation="2") > 0

        # One call to baton.hold with RTP, 5 sequence numbers missing on the way.
        caller = Caller(types.SimpleNamespace(sip_port=engine.port), "1000")
        await caller.dial()
        sent = 0
        for seq in range(1000, 1050):
            if 1020 <= seq < 1025:
                continue
            caller.media.sendto(rtp_packet(seq, 160 * seq), caller.remote)
            sent += 1
        m = await until(url, lambda m: value(m, "baton_rtp_packets_total", direction="in") >= sent
                        and value(m, "baton_rtp_packets_total", direction="out") > 0)
        assert value(m, "baton_sessions_active", level="basic", module="baton.hold") == 1
        assert value(m, "baton_sessions_started_total") == 1
        assert value(m, "baton_transitions_total", module="baton.hold", level="basic") == 1
        assert value(m, "baton_rtp_packets_total", direction="in") == sent
        assert value(m, "baton_rtp_lost_packets_total") == 5
        assert value(m, "baton_rtp_expected_packets_total") == 50
        assert value(m, "baton_rtp_streams") == 1
        assert value(m, "baton_sip_dialogs") == 1
        assert value(m, "baton_sip_requests_received_total", method="INVITE") == 1
        assert value(m, "baton_sip_requests_received_total", method="ACK") == 1

        # An unknown number: a 404, and no session.
        lost = Caller(types.SimpleNamespace(sip_port=engine.port), "9999")
        await lost.dial(expect=404)
        await caller.bye()
        m = await until(url, lambda m: value(m, "baton_sessions_ended_total") == 1
                        and value(m, "baton_ring_fill") == 0)
        assert value(m, "baton_sessions_active") == 0
        assert value(m, "baton_sessions_started_total") == 1
        assert value(m, "baton_sip_responses_sent_total", code="404") == 1
        assert value(m, "baton_sip_responses_sent_total", code="200") >= 2    # INVITE, BYE
        assert value(m, "baton_sip_requests_received_total", method="BYE") == 1
        # The RTP counters of an ended call stay in the totals.
        assert value(m, "baton_rtp_packets_total", direction="in") == sent
        assert value(m, "baton_rtp_packets_total", direction="out") > 0
        assert value(m, "baton_rtp_streams") == 0
        assert value(m, "baton_rtp_streams_closed_total") == 1
        # start, transition, end (+ the node's start record)
        assert value(m, "baton_ring_records_written_total") >= 4
        assert value(m, "baton_ring_spilled_total") == 0
        assert "process_cpu_seconds_total" in m

        a = await until(acct_url, lambda a: value(a, "baton_accountant_records_total")
                        >= value(m, "baton_ring_records_written_total"))
        assert value(a, "baton_accountant_records_total") >= 4
        assert value(a, "baton_accountant_batches_total") >= 1
        assert value(a, "baton_accountant_backlog_records") == 0
        assert value(a, "baton_accountant_last_commit_timestamp_seconds") > 0
        assert value(a, "baton_accountant_lag_seconds") >= 0
        assert value(a, "baton_accountant_open_sessions") == 0
        assert value(a, "baton_accountant_bad_records_total") == 0
        assert engine.stop() == 0
    finally:
        if engine.proc.poll() is None:
            engine.proc.kill()
        os.unlink(config)


async def test_policy_denials_and_not_found():
    raw = engine_config(metrics_addr="127.0.0.1:0")
    raw["policy"] = {"deny_modules": {"demo": ["baton.hold"]}}
    async with running_engine(raw) as eng:
        url = eng.metrics.url
        caller = Caller(eng, "1000")
        await caller.dial(expect=500)
        m = await until(url, lambda m: value(m, "baton_policy_denials_total") == 1)
        assert value(m, "baton_policy_denials_total", module="baton.hold") == 1
        assert value(m, "baton_sip_responses_sent_total", code="500") == 1
        async with aiohttp.ClientSession() as http:
            async with http.get(url.replace("/metrics", "/nothing")) as resp:
                assert resp.status == 404
                assert "metrics" in (await resp.json())["error"]


def test_config_names_the_bad_address():
    for key in ("metrics_addr", "accountant_metrics_addr"):
        with pytest.raises(ConfigError) as err:
            from_dict({"engine": {key: "127.0.0.1:99999"}})
        assert err.value.key == f"engine.{key}"
    assert from_dict({"engine": {"metrics_addr": "127.0.0.1:9090"}}).metrics_addr == \
        "127.0.0.1:9090"
    r = subprocess.run([BATON, "serve", "--config", DEMO, "--metrics-addr", "nowhere:port"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "engine.metrics_addr" in r.stderr


def test_a_taken_metrics_port_is_named():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([BATON, "serve", "--config", DEMO, "--sip-addr", "127.0.0.1:0",
                            "--grpc-addr", "127.0.0.1:0", "--data-dir", tempfile.mkdtemp(),
                            "--http-addr", "127.0.0.1:0",
                            "--no-accountant", "--metrics-addr", f"127.0.0.1:{port}"],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert f"cannot listen on engine.metrics_addr 127.0.0.1:{port}" in r.stderr
    assert "ERROR" not in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_gc_pause_histogram_counts_each_collection_in_its_bucket():
    from engine.common.metrics import GcPauses

    now = [0.0]
    pauses = GcPauses()
    pauses._clock = lambda: now[0]
    for gen, seconds in ((0, 0.0002), (0, 0.0008), (1, 0.003), (2, 0.135), (2, 2.0)):
        pauses._callback("start", {"generation": gen})
        now[0] += seconds
        pauses._callback("stop", {"generation": gen})
    fam = pauses.family()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in fam.samples}

    def bucket(gen, le):
        return samples[("baton_gc_pause_seconds_bucket", (("generation", gen), ("le", le)))]

    assert bucket("0", "0.0005") == 1 and bucket("0", "0.001") == 2 and bucket("0", "+Inf") == 2
    assert bucket("1", "0.002") == 0 and bucket("1", "0.005") == 1
    assert bucket("2", "0.1") == 0 and bucket("2", "0.5") == 1 and bucket("2", "+Inf") == 2
    assert samples[("baton_gc_pause_seconds_count", (("generation", "2"),))] == 2
    assert samples[("baton_gc_pause_seconds_sum", (("generation", "2"),))] == pytest.approx(2.135)
    # Installed, the hook sees real collections; uninstalled, it lets go.
    import gc

    pauses = GcPauses()
    pauses.install()
    try:
        gc.collect()
        assert sum(pauses.counts[2]) == 1 and pauses.sums[2] > 0
    finally:
        pauses.uninstall()
    gc.collect()
    assert sum(pauses.counts[2]) == 1
