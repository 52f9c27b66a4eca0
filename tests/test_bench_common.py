"""bench/common.py: how a driver reports its result (the JSON line and the result files),
reads the engine's metrics and checks --rates."""
from __future__ import annotations

import argparse
import json
import time

import pytest

from engine.cli import bench as bench_cli

common = bench_cli._bench_common()


def _args(tmp_path, no_files=False):
    return argparse.Namespace(no_files=no_files, results_dir=tmp_path)


def _draw(path):
    path.write_bytes(b"png")
    return True


def test_report_writes_record_and_prints_line(tmp_path, capsys):
    result = {"bench": "x", "errors": []}
    started = time.mktime((2024, 5, 6, 7, 8, 9, 0, 0, -1))
    common.report("x", result, _args(tmp_path), started, ["--quick"], _draw,
                  {"runs": [1, 2]}, meta=lambda: {"tool": "v1"})
    line = json.loads(capsys.readouterr().out)
    (json_path,) = tmp_path.glob("*.json")
    assert json_path.name.startswith("x-")
    assert line == {"bench": "x", "errors": [], "png": str(json_path.with_suffix(".png")),
                    "json": str(json_path)}
    assert json_path.with_suffix(".png").read_bytes() == b"png"
    text = json_path.read_text()
    assert text.startswith("{\n  ") and text.endswith("}\n")
    record = json.loads(text)
    assert list(record) == ["bench", "errors", "png", "json", "runs", "meta"]
    assert record["runs"] == [1, 2]
    meta = record["meta"]
    assert list(meta)[-3:] == ["started", "tool", "argv"]
    assert meta["started"] == "2024-05-06T07:08:09" and meta["tool"] == "v1"
    assert meta["argv"] == ["--quick"]
    assert {"cpus", "cpu_model", "kernel", "python", "loadavg"} <= set(meta)


def test_report_without_a_plot_names_no_png(tmp_path, capsys):
    result = {"bench": "x"}
    common.report("x", result, _args(tmp_path), time.time(), [], lambda png: False)
    (json_path,) = tmp_path.glob("*.json")
    assert json.loads(capsys.readouterr().out) == {"bench": "x", "json": str(json_path)}
    assert not list(tmp_path.glob("*.png"))
    assert list(json.loads(json_path.read_text())) == ["bench", "json", "meta"]


def test_report_no_files_prints_only(tmp_path, capsys):
    called = []
    common.report("x", {"bench": "x"}, _args(tmp_path, no_files=True), time.time(), [],
                  lambda png: called.append("plot") or True,
                  meta=lambda: called.append("meta") or {})
    assert json.loads(capsys.readouterr().out) == {"bench": "x"}
    assert called == [] and not list(tmp_path.iterdir())


def test_report_line_writes_the_printed_line(tmp_path, capsys):
    result = {"benchmark": "ring", "n": 1}
    common.report_line("ring", result, _args(tmp_path))
    out = capsys.readouterr().out
    (json_path,) = tmp_path.glob("ring-*.json")
    assert json_path.read_text() == out == json.dumps(result) + "\n"
    assert result == {"benchmark": "ring", "n": 1}


def test_report_line_no_files_prints_only(tmp_path, capsys):
    common.report_line("ring", {"n": 1}, _args(tmp_path, no_files=True))
    assert json.loads(capsys.readouterr().out) == {"n": 1}
    assert not list(tmp_path.iterdir())


def test_scrape_metrics_reads_samples_with_their_labels():
    import http.server
    import threading

    page = (b"# HELP baton_sip_dialogs Dialogs\n# TYPE baton_sip_dialogs gauge\n"
            b"baton_sip_dialogs 12\n"
            b'baton_load_calls_ended_total{reason="bye"} 3.5e+02\n')

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        got = common.scrape_metrics(f"http://127.0.0.1:{server.server_port}/metrics", 5)
    finally:
        server.shutdown()
        server.server_close()
    assert got == {"baton_sip_dialogs": 12.0,
                   'baton_load_calls_ended_total{reason="bye"}': 350.0}


def test_check_rate_args_parses_rates_and_refuses_bad_ones():
    p = argparse.ArgumentParser()
    ok = argparse.Namespace(rates="0, 100000,2e5", seconds=1.0, repeat=1, size=172)
    common.check_rate_args(p, ok)
    assert ok.rate_list == [0, 100000, 200000]
    for bad in ({"rates": "x"}, {"rates": "-1"}, {"rates": ""}, {"seconds": 0},
                {"repeat": 0}, {"size": 11}, {"size": 1501}):
        args = argparse.Namespace(**{"rates": "0", "seconds": 1.0, "repeat": 1, "size": 172,
                                     **bad})
        with pytest.raises(SystemExit):
            common.check_rate_args(p, args)
