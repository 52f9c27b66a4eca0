"""bench/common.py: how a driver reports its result (the JSON line and the result files)."""
from __future__ import annotations

import argparse
import json
import time

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
