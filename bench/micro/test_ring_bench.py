"""Micro-benchmarks of the call-control ring, both implementations.

Each round is 1000 records: stamp_transition, append of a 120-byte payload,
and read (of 1000 published records). Draining and refilling between rounds is
setup, not measured, so every round runs on the ring and never spills; the
4096-slot ring is warm (every page touched) after the warm-up rounds, as a
long-running engine's is:

    .venv/bin/python -m pytest bench/micro/test_ring_bench.py --benchmark-only
"""
from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from ext import ring_py  # noqa: E402

try:
    from ext import ring as c_ring
except ImportError:  # not built: only the reference is measured
    c_ring = None

IMPLS = [pytest.param(c_ring, id="c", marks=pytest.mark.skipif(c_ring is None,
                                                                reason="ext.ring not built")),
         pytest.param(ring_py, id="py")]
PER_ROUND = 1000
PAYLOAD = bytes(range(120))


@pytest.fixture
def ring(mod, tmp_path):
    path = str(tmp_path / "ring.dat")
    with mod.RingWriter(path, slots=4096, slot_size=256) as w, mod.RingReader(path, 0) as r:
        yield w, r


def _drain(r) -> None:
    while r.read(4096):
        pass
    if r.position:
        r.release(r.position)


@pytest.mark.parametrize("mod", IMPLS)
def test_stamp_transition(benchmark, mod, ring):
    w, r = ring
    stamp = w.stamp_transition

    def stamp_round():
        for i in range(PER_ROUND):
            stamp("s00001a2", "a0042", "ivr", "queue", "info", "", 12_000_000_000 + i,
                  1_764_000_000_000_000_000 + i)

    benchmark.extra_info["records_per_round"] = PER_ROUND
    benchmark.pedantic(stamp_round, setup=lambda: _drain(r), rounds=100, iterations=1,
                       warmup_rounds=5)
    assert w.spilled == 0


@pytest.mark.parametrize("mod", IMPLS)
def test_append_120_bytes(benchmark, mod, ring):
    w, r = ring
    append = w.append

    def append_round():
        for _ in range(PER_ROUND):
            append(PAYLOAD)

    benchmark.extra_info["records_per_round"] = PER_ROUND
    benchmark.pedantic(append_round, setup=lambda: _drain(r), rounds=100, iterations=1,
                       warmup_rounds=5)
    assert w.spilled == 0


@pytest.mark.parametrize("mod", IMPLS)
def test_read_1000(benchmark, mod, ring):
    w, r = ring

    def refill():
        _drain(r)
        for _ in range(PER_ROUND):
            w.append(PAYLOAD)

    def read_round():
        return r.read(PER_ROUND)

    benchmark.extra_info["records_per_round"] = PER_ROUND
    got = benchmark.pedantic(read_round, setup=refill, rounds=100, iterations=1,
                       warmup_rounds=5)
    assert len(got) == PER_ROUND and got[0][1] == PAYLOAD
    assert w.spilled == 0
