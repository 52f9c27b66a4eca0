"""Micro-benchmarks of the G.711 codec and the DTMF detector, both implementations.

G.711 throughput is reported as MB/s of 16-bit linear PCM (`extra_info`), for
a bulk 1 s buffer and for single 20 ms frames. DTMF is one media tick: a
20 ms frame fed to each of 100 channels' detectors; `extra_info` turns the
mean tick time into real-time channels per core.

    .venv/bin/python -m pytest bench/micro/test_media_bench.py --benchmark-only
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from ext import dtmf_py as py_dtmf  # noqa: E402
from ext import g711_py as py_g711  # noqa: E402

try:
    from ext import g711 as c_g711
except ImportError:  # not built: only the reference is measured
    c_g711 = None
try:
    from ext import dtmf as c_dtmf
except ImportError:
    c_dtmf = None

FRAME = 160
CHANNELS = 100
G711 = [pytest.param(c_g711, id="c", marks=pytest.mark.skipif(c_g711 is None, reason="ext.g711 not built")),
        pytest.param(py_g711, id="py")]
DTMF = [pytest.param(c_dtmf, id="c", marks=pytest.mark.skipif(c_dtmf is None, reason="ext.dtmf not built")),
        pytest.param(py_dtmf, id="py")]
SIZES = [pytest.param(8000, id="1s"), pytest.param(FRAME, id="20ms")]


def _speech_like(n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    x = 6000 * np.sin(2 * np.pi * 180 * t / 8000) * (1 + np.sin(2 * np.pi * 3 * t / 8000))
    return np.clip(x + rng.normal(0, 800, n), -32768, 32767).astype(np.int16)


def _throughput(benchmark, pcm_bytes: int):
    benchmark.extra_info["MB_per_s_pcm"] = round(pcm_bytes / benchmark.stats.stats.mean / 1e6, 1)


@pytest.mark.parametrize("law", ["ulaw", "alaw"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("mod", G711)
def test_g711_encode(benchmark, mod, n, law):
    pcm = _speech_like(n).tobytes()
    out = benchmark(getattr(mod, law + "_encode"), pcm)
    assert len(out) == n
    _throughput(benchmark, 2 * n)


@pytest.mark.parametrize("law", ["ulaw", "alaw"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("mod", G711)
def test_g711_decode(benchmark, mod, n, law):
    codes = getattr(py_g711, law + "_encode")(_speech_like(n))
    out = benchmark(getattr(mod, law + "_decode"), codes)
    assert len(out) == 2 * n
    _throughput(benchmark, 2 * n)


@pytest.mark.parametrize("mod", DTMF)
def test_dtmf_tick(benchmark, mod):
    """One 20 ms frame into each of CHANNELS detectors."""
    dets = [mod.DtmfDetector() for _ in range(CHANNELS)]
    audio = _speech_like(FRAME * 50, seed=2)
    frames = [audio[i:i + FRAME] for i in range(0, len(audio), FRAME)]
    state = {"i": 0}

    def tick():
        f = frames[state["i"] % len(frames)]
        state["i"] += 1
        for d in dets:
            d.feed(f)

    benchmark(tick)
    benchmark.extra_info["channels_per_core"] = round(CHANNELS * 0.020 / benchmark.stats.stats.mean)
