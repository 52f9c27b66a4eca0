"""Micro-benchmarks of the conference mixer, both implementations.

One tick of a 10- and a 100-party μ-law conference (put every frame, mix,
encode), and the bare mix_minus kernel on the same sizes:

    .venv/bin/python -m pytest bench/micro/test_mix_bench.py --benchmark-only
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from ext import g711_py as g711  # noqa: E402
from ext import mix_py as py_mix  # noqa: E402

try:
    from ext import mix as c_mix
except ImportError:  # not built: only the reference is measured
    c_mix = None

FRAME = 160
IMPLS = [pytest.param(c_mix, id="c", marks=pytest.mark.skipif(c_mix is None,
                                                               reason="ext.mix not built")),
         pytest.param(py_mix, id="py")]
SIZES = [pytest.param(10, id="10-party"), pytest.param(100, id="100-party")]


def _frames(n: int) -> np.ndarray:
    rng = np.random.default_rng(n)
    return rng.normal(0, 4000, size=(n, FRAME)).clip(-32768, 32767).astype(np.int16)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mod", IMPLS)
def test_conference_tick_ulaw(benchmark, mod, size):
    conf = mod.Conference(max_participants=size)
    feed = [(pid, g711.ulaw_encode(f)) for pid, f in enumerate(_frames(size))]
    for pid, _ in feed:
        conf.add(pid, "ulaw")

    def tick():
        for pid, frame in feed:
            conf.put(pid, frame)
        return conf.mix()

    out = benchmark(tick)
    assert len(out) == size and all(len(v) == FRAME for v in out.values())


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mod", IMPLS)
def test_mix_minus(benchmark, mod, size):
    frames = _frames(size)
    active = np.ones(size, dtype=bool)
    active[::4] = False
    out = benchmark(mod.mix_minus, frames, active)
    assert out.shape == frames.shape
